"""No stray copies of a split's rows, narrow listening (issue 14, items 8 and 9).

The Parquet shards of a split (forgotten rows included) exist only while their statistic is
computed: deleted after the reduce, and after a failure too; a run killed before its clean-up
has its shards removed by the next one. A local Ray started by us listens on 127.0.0.1 only,
and the token file it authenticates with is private (0600).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.config import load_params
from pipeline_lib.stats.store import read_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path: Path):
    return load_params(
        str(REPO / "params.yaml"),
        {"stats.out_dir": str(tmp_path / "stats"), "stats.n_shards": 3, "ray.num_cpus": 1},
    )


def rows(n: int = 30):
    rng = np.random.default_rng(0)
    ids = np.array([f"forgotten-{i}" for i in range(n)])
    return ids, rng.normal(size=(n, 8, 8)).astype(np.float32), rng.integers(0, 10, size=n)


def test_shards_exist_only_while_used(params):
    from tasks.statistics import temporary_shards

    ids, X, y = rows()
    root = params.resolve(params.stats.out_dir) / "shards"
    with temporary_shards(params, "forget", ids, X, y) as shards:
        assert len(shards) == 3 and all(Path(p).is_file() for p in shards)
        back = np.concatenate([read_shard(p)[0] for p in shards])
        assert back.tolist() == ids.tolist()
    assert not root.exists() or not any(root.rglob("*"))
    with pytest.raises(RuntimeError, match="reduce failed"):
        with temporary_shards(params, "forget", ids, X, y) as shards:
            assert Path(shards[0]).is_file()
            raise RuntimeError("reduce failed")
    assert not root.exists() or not any(root.rglob("*"))


def test_shards_left_by_a_killed_run_or_an_older_version_are_swept(params):
    from tasks.statistics import sweep_shards, temporary_shards

    ids, X, y = rows()
    root = params.resolve(params.stats.out_dir) / "shards"
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = {
        "killed": root / f"forget-{host}-{dead.pid}-0123abcd",  # its process is gone
        "old layout": root / "forget-5f2a9c0d1e3b4a67",  # named by its data, never deleted
        "half written": root / f".forget-{host}-{dead.pid}-0123abcd.x1y2.tmp",
    }
    alive = root / f"retain-{host}-{os.getpid()}-89abcdef"  # a run still using its shards
    for d in [*left.values(), alive]:
        d.mkdir(parents=True)
        (d / "shard-00000.parquet").write_bytes(b"rows")
    with temporary_shards(params, "forget", ids, X, y):
        pass
    assert not any(d.exists() for d in left.values())
    assert alive.exists()  # not ours to remove
    assert sweep_shards(root) == []


def test_sharded_fisher_on_ray_leaves_no_shard_behind(params, tmp_path):
    """The Ray path end to end: shards written, read by Ray tasks, reduced, deleted; a failing
    Ray task deletes them too."""
    import ray

    from pipeline_lib.config import to_dict
    from pipeline_lib.models.image import build_model
    from tasks import stats as ray_stats
    from tasks.statistics import temporary_shards

    ids, X, y = rows()
    model = build_model(params.model, (8, 8), 10, seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    root = params.resolve(params.stats.out_dir) / "shards"
    options = {"kind": "true_expected", "batch_size": 16, "seed": 0}
    try:
        with temporary_shards(params, "forget", ids, X, y) as shards:
            run = ray_stats.run_shards(
                "fisher", state, to_dict(params.model), (8, 8), 10, shards, options, params.ray, 1
            )
        assert run["n"] == len(ids) and all(
            torch.isfinite(t).all() for sums, _ in run["parts"] for t in sums.values()
        )
        assert not root.exists() or not any(root.rglob("*"))
        with pytest.raises(Exception, match="unknown statistic"):
            with temporary_shards(params, "forget", ids, X, y) as shards:
                ray_stats.run_shards(
                    "bogus", state, to_dict(params.model), (8, 8), 10, shards, {}, params.ray, 1
                )
        assert not root.exists() or not any(root.rglob("*"))

        # narrow listening: the node, its driver and its workers are on the loopback address
        @ray.remote
        def where() -> str:
            return ray.util.get_node_ip_address()

        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        assert ray.get(where.remote()) == "127.0.0.1"
        psutil = pytest.importorskip("psutil")
        ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
        listening = [
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours
        ]
        assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        token = Path.home() / ".ray" / "auth_token"
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" and token.exists():
            assert stat.S_IMODE(token.stat().st_mode) == 0o600
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- MLflow server


def _server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        MLFLOW_DATA_DIR=str(data_dir),
        MLFLOW_WORKERS="1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        **extra,
    )
    return env


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::"])
def test_the_mlflow_script_refuses_other_interfaces_without_auth(tmp_path, host):
    script = REPO / "infra" / "mlflow-server.sh"
    out = subprocess.run(
        ["bash", str(script)],
        env=_server_env(tmp_path / "mlflow", MLFLOW_HOST=host),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "MLFLOW_AUTH=basic" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mlflow").exists()  # refused before anything was written


@pytest.mark.cluster
def test_the_mlflow_server_with_basic_auth_needs_a_password(tmp_path):
    """``MLFLOW_AUTH=basic infra/mlflow-server.sh`` on 127.0.0.1: 401 without credentials or
    with a wrong password, 200 with the admin password it generated (a file only its user can
    read); the MLflow client logs a run with MLFLOW_TRACKING_USERNAME/PASSWORD."""
    import base64
    import time
    import urllib.error
    import urllib.request

    from tests.conftest import free_port

    pytest.importorskip("flask_wtf")
    data_dir, port = tmp_path / "mlflow", free_port()
    env = _server_env(data_dir, MLFLOW_AUTH="basic", MLFLOW_PORT=str(port))
    proc = subprocess.Popen(
        ["bash", str(REPO / "infra" / "mlflow-server.sh")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"),
    )
    base = f"http://127.0.0.1:{port}"

    def status(path: str, password: str | None = None) -> int:
        req = urllib.request.Request(base + path)
        if password is not None:
            token = base64.b64encode(f"admin:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if status("/health") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(1)
        password_file = data_dir / "admin_password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text()
        api = "/api/2.0/mlflow/experiments/search?max_results=5"
        assert status(api) == 401
        assert status(api, "not-the-password") == 401
        assert status(api, password) == 200
        code = (
            "import mlflow\n"
            "with mlflow.start_run(experiment_id=mlflow.create_experiment('auth')) as r:\n"
            "    mlflow.log_metric('m', 1.0)\n"
            "print(mlflow.get_run(r.info.run_id).data.metrics['m'])"
        )
        client_env = {
            **env,
            "MLFLOW_TRACKING_URI": base,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": password,
        }
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "1.0", out.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_chunk_half_written_by_a_killed_process_is_removed_on_resume(tmp_path: Path):
    """atomic_path names its temporary sibling by pid and host; a store's resume
    (pending_chunks) removes the ones whose process is gone, and keeps a live writer's."""
    from pipeline_lib.attribution.store import AttributionStore, StoreSpec
    from pipeline_lib.io import _owner_tag, atomic_path, stale_temps

    chunks = tmp_path / "s" / "chunks"
    # the name atomic_path gives (a live writer: this process)
    with atomic_path(chunks / "0000004") as work:
        live = work.parent
        assert live.name.startswith(f".0000004.{_owner_tag()}.") and live.name.endswith(".tmp")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host = _owner_tag().split("@", 1)[1]
        gone = chunks / f".0000002.{dead.pid}@{host}.k3j2h1.tmp"
        other_host = chunks / f".0000006.{dead.pid}@elsewhere.k3j2h1.tmp"
        for d in (gone, other_host):
            (d / d.name[1:8]).mkdir(parents=True)
        assert stale_temps(chunks) == [gone]
        spec = StoreSpec(
            kind="subsets",
            n_models=8,
            alpha=0.5,
            seed=0,
            chunk_size=2,
            n_train=10,
            n_classes=2,
            data_hash="0" * 16,
            model={"name": "mlp"},
            train={},
        )
        store = AttributionStore(tmp_path / "s", spec)
        store.initialise(np.arange(12), np.array(["train"] * 10 + ["test"] * 2), np.zeros(12))
        assert store.pending_chunks() == [(0, 2), (2, 4), (4, 6), (6, 8)]
        assert not gone.exists() and other_host.exists() and live.exists()
        work.mkdir()
    assert not live.exists() and (chunks / "0000004").is_dir()
