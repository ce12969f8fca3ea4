"""The team set-up on real servers: PostgreSQL from Debian's package (infra/postgres.sh, the
``postgres_cluster`` fixture) holds MLflow's tables, behind a real MLflow tracking server
(infra/mlflow-server.sh postgres, on 127.0.0.1), and the request ledger's tables in the same
database; the registry is used through the server and three processes claim from the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from mlflow import MlflowClient

from pipeline_lib.io import save_weights, sha256_file
from tasks.ledger import Ledger
from tasks.registry import (
    download_version_weights,
    production_version,
    register_version,
    version_chain,
)
from tests.conftest import REPO, PostgresCluster, free_port
from tests.test_ledger import WORKER, _req
from tests.test_registry import ARCH

pytestmark = pytest.mark.cluster

MODEL = "unlearnflow-team"


@pytest.fixture(scope="module")
def mlflow_server(
    postgres_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`infra/mlflow-server.sh postgres` on a free port: backend store in the session's
    PostgreSQL database, artifacts in a temp dir served by the server. Yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_DATA_DIR": str(root),
        "PG_DATA_DIR": str(postgres_cluster.state_dir),  # the running cluster: reused
        # MLflow's job runner (7 more processes, for GenAI jobs) is not used here.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log_path = root / "server.log"
    with log_path.open("w") as log:
        # Own process group: teardown stops the server and everything it started.
        proc = subprocess.Popen(
            ["bash", str(REPO / "infra" / "mlflow-server.sh"), "postgres"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_registry_through_a_tracking_server_backed_by_postgresql(
    mlflow_server: str, postgres_url: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    exp = client.create_experiment("team-setup")

    def weights(name: str, fill: float) -> Path:
        path = tmp_path / f"{name}.safetensors"
        save_weights({"fc.weight": torch.full((3, 4), fill), "fc.bias": torch.zeros(3)}, path)
        return path

    w1 = weights("v1", 1.0)
    run1 = client.create_run(exp).info.run_id
    tags = {"kind": "exact", "method": "train", "data_version": "md5-team"}
    v1 = register_version(mlflow_server, MODEL, w1, ARCH, run1, tags, set_production=True)
    prod = production_version(mlflow_server, MODEL)
    assert prod is not None and str(prod.version) == v1 == "1" and prod.run_id == run1
    assert prod.source.startswith("mlflow-artifacts:/")  # uploaded through the server
    path, arch = download_version_weights(mlflow_server, MODEL, v1, tmp_path / "dl")
    assert arch == ARCH and sha256_file(path) == sha256_file(w1)

    approx = {"kind": "approximate", "parent_version": v1, "request_ids": ["req-a"]}
    v2 = register_version(
        mlflow_server,
        MODEL,
        weights("v2", 2.0),
        ARCH,
        client.create_run(exp).info.run_id,
        {**approx, "method": "fisher_diagonal"},
        set_production=True,
    )
    assert str(production_version(mlflow_server, MODEL).version) == v2 == "2"  # type: ignore[union-attr]
    assert [str(mv.version) for mv in version_chain(mlflow_server, MODEL, v2)] == ["2", "1"]

    # What the server stored is in PostgreSQL.
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        alias = conn.execute(
            sa.text("SELECT version FROM registered_model_aliases WHERE name = :n AND alias = :a"),
            {"n": MODEL, "a": "production"},
        ).scalar_one()
    engine.dispose()
    assert str(alias) == "2"


def test_three_processes_claim_from_the_ledger_in_mlflows_postgresql_database(
    mlflow_server: str, postgres_url: str, tmp_path: Path
) -> None:
    """Each of 9 requests processed exactly once, in arrival order, one at a time, by three
    processes contending for them (the worker of tests/test_ledger.py)."""
    ledger = Ledger(postgres_url)
    tables = set(sa.inspect(ledger.engine).get_table_names())
    assert {"unlearnflow_requests", "unlearnflow_request_events", "unlearnflow_models"} <= tables
    assert {"registered_models", "model_versions", "runs"} <= tables  # MLflow's, same database

    ids = [f"team-{i}" for i in range(9)]
    for rid in ids:
        ledger.submit(_req(rid, f"s{rid}"), MODEL)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, MODEL, str(go), str(r)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):  # all connected: start together
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), "a worker exited before the start"
            time.sleep(0.01)
        go.touch()
        outputs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert sorted(rid for out in outputs for rid in out) == sorted(ids)  # each exactly once
    rows = ledger.list(model_name=MODEL)
    assert [r.request_id for r in rows] == ids and all(r.status == "done" for r in rows)
    claims, finishes = [], []
    for rid in ids:
        events = ledger.events(rid)
        assert [(e.from_status, e.to_status) for e in events] == [
            (None, "pending"),
            ("pending", "processing"),
            ("processing", "done"),
        ]
        claims.append(events[1].at)
        finishes.append(events[2].at)
    # In arrival order, never two at once: each claim follows the previous request's finish.
    assert claims == sorted(claims)
    assert all(claims[i + 1] >= finishes[i] for i in range(len(ids) - 1))
    assert len({r.owner for r in rows}) >= 2, "the workers did not contend"
    ledger.close()


@pytest.mark.slow  # three processes, each starting its own temporary Prefect API: ~100 s
def test_three_sweeps_at_once_against_the_postgresql_backed_tracking_server(
    mlflow_server: str, postgres_url: str, tmp_path: Path
) -> None:
    """Issue 12 on the team set-up: three `unlearn sweep` processes started at once on three
    pending requests, MLflow through the tracking server (PostgreSQL behind it) and the
    ledger in the same PostgreSQL database (service.ledger_url): one first version, each
    request processed exactly once (one run, one version, a linear chain), each run with its
    own request's forget ids (tests/test_service.py's checks)."""
    from tests.test_service import (
        assert_each_processed_once,
        cli,
        concurrent_sweeps,
        new_project,
        prepare,
    )

    model = "unlearnflow-team-sweep"
    p = new_project(
        tmp_path / "proj",
        model=model,
        tracking_uri=mlflow_server,
        ledger_url=postgres_url,
        experiment="team-sweep",
    )
    prepare(p)
    ids = [f"team-sweep-{i}" for i in range(3)]
    files = [p.write_request(rid, {"fraction": 0.1, "seed": 50 + i}) for i, rid in enumerate(ids)]
    assert cli("submit", "--params", p.params, *files)[0] == 0
    outputs = concurrent_sweeps(p, tmp_path)
    assert_each_processed_once(p, ids, outputs)

    # the ledger and the registry behind the server are one PostgreSQL database
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        done = conn.execute(
            sa.text(
                "SELECT count(*) FROM unlearnflow_requests WHERE model_name = :m AND status = 'done'"
            ),
            {"m": model},
        ).scalar_one()
        versions = conn.execute(
            sa.text("SELECT count(*) FROM model_versions WHERE name = :m"), {"m": model}
        ).scalar_one()
    engine.dispose()
    assert (done, versions) == (3, 4)
