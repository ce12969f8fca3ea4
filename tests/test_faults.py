"""Faults on real components (issue 14): interrupted commands leave no debris.

- MLflow runs carry the host, pid and start time of the process that made them; a run left
  RUNNING by a process that is gone is closed as FAILED with a note (real SQLite store).
- SIGTERM (and SIGINT) of ``unlearn run``: the temporary Prefect API server stops listening,
  the open MLflow run ends KILLED, the command exits 143 (130).
- SIGKILL of ``unlearn attribute`` after its first chunk: the re-run completes the store,
  every model id exactly once, and closes the dead command's run as FAILED.
- SIGKILL of a Ray worker in the middle of a chunk: Ray retries the chunk; the store is
  complete, every model id exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.conftest import REPO, make_dvc_project

pytestmark = pytest.mark.usefixtures("one_thread")

UNLEARN = str(Path(sys.executable).parent / "unlearn")
REQUEST = {
    "request_id": "req-fault",
    "reason": "fault test",
    "forget": {"fraction": 0.1, "seed": 0},
}


def fault_params(root: Path) -> dict:
    """A small digits project: 200 training rows, a small MLP, one Ray CPU."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_train=200, max_test=60)
    params["model"].update(hidden=[16])
    params["train"].update(epochs=2)
    params["request"]["file"] = "requests/req.yaml"
    params["attribution"].update(n_models=16, chunk_size=2, lds_heldout=0, epochs=2)
    params["ray"].update(num_cpus=1)
    params["service"].update(model_name="unlearnflow-faults", oracle="never")
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="faults", dvc_root=str(root)
    )
    return params


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the tests of run tags and statuses (each its experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """One project for the process tests (its data prepared and its MLflow store created by
    the first command that needs them); each test makes its own store or request."""
    root = tmp_path_factory.mktemp("faults") / "proj"
    make_dvc_project(root, yaml.safe_dump(fault_params(root)))
    (root / "requests" / "req.yaml").write_text(yaml.safe_dump(REQUEST))
    return root


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- stale runs ------------------------------------------------------------------------------


def test_runs_record_their_process_and_dead_processes_runs_are_closed(mlflow_uri: str):
    from mlflow import MlflowClient

    from tasks import tracking

    uri = mlflow_uri
    client = MlflowClient(uri)
    exp = tracking._experiment_id(client, "stale")
    host = socket.gethostname()
    me = psutil.Process()

    # a run we start is tagged with this process and is not closed by the clean-up
    ours = tracking.create_run(client, exp, "ours", {"kind": "test"})
    tags = client.get_run(ours).data.tags
    assert tags[tracking.HOST_TAG] == host and tags[tracking.PID_TAG] == str(os.getpid())
    assert abs(float(tags[tracking.STARTED_TAG]) - me.create_time()) < 1.0

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        alive = psutil.Process(sleeper.pid)

        def running(name: str, pid: int, started: float | None, on: str = host) -> str:
            t = {tracking.HOST_TAG: on, tracking.PID_TAG: str(pid)}
            if started is not None:
                t[tracking.STARTED_TAG] = f"{started:.3f}"
            return client.create_run(exp, run_name=name, tags=t).info.run_id

        dead = running("dead", _dead_pid(), 1.0e9)
        reused = running("pid-reused", sleeper.pid, alive.create_time() - 3600)  # pid recycled
        live = running("live", sleeper.pid, alive.create_time())
        other_host = running("other-host", _dead_pid(), 1.0e9, on=f"not-{host}")
        untagged = client.create_run(exp, run_name="untagged").info.run_id
        finished = running("finished", _dead_pid(), 1.0e9)
        client.set_terminated(finished, "FINISHED")

        closed = tracking.close_stale_runs(uri)
    finally:
        sleeper.kill()
        sleeper.wait()

    assert sorted(closed) == sorted([dead, reused])
    status = {r: client.get_run(r).info.status for r in (ours, live, other_host, untagged)}
    assert set(status.values()) == {"RUNNING"}, status
    assert client.get_run(finished).info.status == "FINISHED"
    for run_id in closed:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.info.end_time is not None
        note = run.data.tags[tracking.NOTE_TAG]
        assert f"pid {run.data.tags[tracking.PID_TAG]}" in note and "killed or crashed" in note

    # the clean-up runs before a process's first run of a store: a new dead run is closed
    # when a new command (here: a forgotten sweep) starts its first run
    later = running("dead-later", _dead_pid(), 1.0e9)
    tracking._SWEPT.discard(uri)
    nxt = tracking.create_run(client, exp, "next-command", {})
    assert client.get_run(later).info.status == "FAILED"
    for run_id in (ours, nxt):
        tracking.end_run(uri, run_id, "FINISHED")


def test_an_interrupted_run_ends_killed(mlflow_uri: str):
    from mlflow import MlflowClient

    from tasks import tracking

    uri = mlflow_uri
    client = MlflowClient(uri)
    exp = tracking._experiment_id(client, "interrupted")
    failed = tracking.create_run(client, exp, "fails", {})
    try:
        raise ValueError("a real failure")
    except ValueError:
        tracking.end_run(uri, failed, "FAILED")
    interrupted = tracking.create_run(client, exp, "interrupted", {})
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        tracking.end_run(uri, interrupted, "FAILED")  # what a flow's except clause does
    left_open = tracking.create_run(client, exp, "left-open", {})
    assert tracking.close_active_runs() == [left_open]
    assert [client.get_run(r).info.status for r in (failed, interrupted, left_open)] == [
        "FAILED",
        "KILLED",
        "KILLED",
    ]


def test_a_second_signal_while_unwinding_exits_at_once():
    """The first SIGTERM raises (the command unwinds); a second one during the unwinding
    exits at once with the first signal's code."""
    script = """
import os, signal, sys, time
from tasks.interruption import Interrupted, interruptible
try:
    with interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
except Interrupted:
    print("unwinding", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
print("not reached", flush=True)
"""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 143, proc.stderr
    assert proc.stdout == "unwinding\n" and "SIGINT again: stopping now" in proc.stderr
    assert time.monotonic() - t0 < 25


# -- processes --------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    if "PREFECT_API_URL" not in extra:
        env.pop("PREFECT_API_URL", None)  # the command starts its own temporary API
    return env


def _start(project: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [UNLEARN, *args],
        cwd=project,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own session: the test can find and clean up its tree
    )


def _output(proc: subprocess.Popen) -> str:
    with contextlib.suppress(Exception):
        return proc.communicate(timeout=30)[0][-4000:]
    return ""


def _clean_up(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the command's process tree (its session)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == proc.pid:
                p.kill()


def _prefect_server(proc: subprocess.Popen) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any("prefect.server.api.server:create_app" in a for a in child.cmdline()):
                    return child
    return None


def _listening_port(server: psutil.Process) -> int | None:
    with contextlib.suppress(psutil.Error):
        for conn in server.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN:
                return conn.laddr.port
    return None


def _runs(db: Path, status: str | None = None) -> list[tuple[str, str]]:
    """(run id, status) rows of the MLflow SQLite store, read with sqlite3 (no MLflow in the
    polling loop, no schema migration racing the command that creates the store)."""
    if not db.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            rows = c.execute("SELECT run_uuid, status FROM runs").fetchall()
    except sqlite3.Error:
        return []
    return [r for r in rows if status is None or r[1] == status]


def _wait_for(what: str, proc: subprocess.Popen, check, timeout: float = 400.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the command ended (rc {proc.returncode}) before {what}:\n{_output(proc)}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# a whole `unlearn` process start-up (imports, its Prefect API, DVC, the MLflow store): SIGTERM
# in the default suite (the fault test), SIGINT, the same path, marked slow
@pytest.mark.parametrize(
    ("sig", "code"),
    [
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
        pytest.param(signal.SIGINT, 130, id="SIGINT", marks=pytest.mark.slow),
    ],
)
def test_signal_of_unlearn_run_stops_the_prefect_server_and_kills_the_run(
    project: Path, sig: int, code: int
):
    from mlflow import MlflowClient

    # a request and a model of its own; training long enough that the signal lands while
    # the first production model trains
    name = signal.Signals(sig).name
    request = project / "requests" / f"req-{name}.yaml"
    request.write_text(yaml.safe_dump({**REQUEST, "request_id": f"req-{name}"}))
    sets = {"train.epochs": 400, "service.model_name": f"faults-{name}"}
    proc = _start(
        project, "run", "--request", str(request), *[f"--set={k}={v}" for k, v in sets.items()]
    )
    try:
        server = _wait_for("the temporary Prefect API", proc, lambda: _prefect_server(proc))
        port = _wait_for("the API to listen", proc, lambda: _listening_port(server))
        db = project / "mlflow.db"
        ((run_id, _),) = _wait_for("a RUNNING MLflow run", proc, lambda: _runs(db, "RUNNING"))
        proc.send_signal(sig)
        out = _output(proc)
        assert proc.returncode == code, out
        assert _gone(server), f"the temporary Prefect API (pid {server.pid}) outlived the command"
        assert not _port_open(port), f"port {port} still listening"
        run = MlflowClient(f"sqlite:///{db}").get_run(run_id)
        assert run.info.status == "KILLED", out
        assert run.data.tags["unlearnflow.pid"] == str(proc.pid)
        assert _runs(db, "RUNNING") == []
        assert f"unlearn: interrupted by {signal.Signals(sig).name}; stopped" in out, out
    finally:
        _clean_up(proc)


def _store_dir(project: Path, seed: int) -> Path | None:
    """The subsets store of ``project`` whose models use ``seed``."""
    for root in (project / "artifacts" / "attribution").glob("subsets-*"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads((root / "manifest.json").read_text())["spec"]["seed"] == seed:
                return root
    return None


def _done_chunks(store: Path | None) -> list[Path]:
    """Chunks written completely (a chunk directory is renamed into place when whole)."""
    return sorted(store.glob("chunks/*/meta.json")) if store else []


def _assert_every_model_once(store_root: Path, n_models: int) -> None:
    from pipeline_lib.attribution.store import AttributionStore, model_seed

    store = AttributionStore.open(store_root)
    store.check()  # every id 0..M-1 exactly once, every checksum valid
    masks, seeds, outputs = store.load()
    assert masks.shape[0] == seeds.shape[0] == outputs.shape[0] == n_models
    assert seeds.tolist() == [model_seed(store.spec.seed, m) for m in range(n_models)]
    covered = np.zeros(n_models, dtype=int)
    for meta in json.loads(store.manifest_path.read_text())["chunks"].values():
        covered[meta["start"] : meta["stop"]] += 1
    assert covered.tolist() == [1] * n_models
    chunks = sorted(p.name for p in (store_root / "chunks").iterdir())
    assert chunks == [f"{s:07d}" for s, _ in store.spec.chunks()], chunks  # nothing else


# an `unlearn attribute` process, then the re-run (60-80 s on the shared machine): default suite
def test_sigkill_of_attribute_mid_store_then_rerun_completes(project: Path, prefect_api):
    """SIGKILL after the first chunk is written; the re-run (the same flow, in this process)
    trains only the missing chunks, the store holds every model id once, and the dead
    command's RUNNING MLflow run is closed as FAILED with a note."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from flows.attribution import attribution_flow

    n, seed = 16, 5
    sets = {"attribution.epochs": 40, "attribution.seed": seed}
    args = ["attribute", "--models", str(n)] + [f"--set={k}={v}" for k, v in sets.items()]
    # the session's Prefect API: a SIGKILLed command leaves no temporary server behind
    proc = _start(project, *args, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    try:
        _wait_for("the first chunk", proc, lambda: _done_chunks(_store_dir(project, seed)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        _clean_up(proc)
    store = _store_dir(project, seed)
    done = len(_done_chunks(store))
    assert 1 <= done < n // 2, f"{done} chunks done: the kill should land mid-store"
    db = project / "mlflow.db"
    ((killed_run, _),) = _runs(db, "RUNNING")

    result = attribution_flow(
        params_path=str(project / "params.yaml"), overrides={"attribution.n_models": n, **sets}
    )
    assert Path(result["store"]) == store
    assert result["stats"]["models_trained"] == n - 2 * done  # only the missing chunks
    _assert_every_model_once(store, n)
    run = MlflowClient(f"sqlite:///{db}").get_run(killed_run)
    assert run.info.status == "FAILED"
    assert f"pid {proc.pid}" in run.data.tags["unlearnflow.note"]


@pytest.mark.slow  # a local Ray, the data prepared and the MLflow store created: ~60 s here
def test_sigkill_of_a_ray_worker_is_retried(project: Path, prefect_api):
    """A Ray worker SIGKILLed while it trains a chunk: Ray reruns the chunk, the store is
    complete, every model id once."""
    from flows.attribution import attribution_flow

    killed: list[int] = []
    stop = threading.Event()

    def kill_a_training_worker() -> None:
        me = psutil.Process()
        while not stop.is_set() and not killed:
            for p in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if p.cmdline() and p.cmdline()[0].startswith("ray::_train_chunk_remote"):
                        time.sleep(0.3)  # well inside the chunk
                        p.kill()
                        killed.append(p.pid)
                        break
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_training_worker, daemon=True)
    killer.start()
    try:
        result = attribution_flow(
            params_path=str(project / "params.yaml"),
            overrides={"attribution.epochs": 40, "attribution.seed": 11},
        )
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was seen training a chunk"
    assert result["stats"]["models_trained"] == 16
    _assert_every_model_once(Path(result["store"]), 16)
