"""Shared fixtures. Prefect settings must be in the environment before prefect is imported,
so they are set here at import time, pointing at a per-session temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="unlearnflow-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect-results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "pipeline_lib"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ["PREFECT_RESULTS_DEFAULT_SERIALIZER"] = "json"  # as flows/cli.py: no pickles
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op torch thread is faster and immune to busy-wait contention.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_api():
    """One real temporary Prefect API server (SQLite, 127.0.0.1) for all flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(autouse=True)
def _stop_local_ray():
    """A flow that needs Ray (sharded Fisher statistics, attribution stores) starts a local
    Ray in the test process; stop it after the test so no test inherits another's cluster."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def make_dvc_project(root: Path, params_text: str) -> Path:
    """A real DVC repo in ``root`` holding the project's dvc.yaml and stage code."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(
        REPO / "pipeline_lib", root / "pipeline_lib", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "requests").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(params_text)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root


def fresh_cli(
    argv: list[str], modules: tuple[str, ...]
) -> tuple[subprocess.CompletedProcess, list[object]]:
    """Run ``unlearn *argv`` in a fresh interpreter (the repository as working directory).

    Returns the finished process (its stdout is the command's) and, read from the last line
    of its stderr, ``[exit code, then for each of modules whether it was imported]``."""
    code = (
        "import json, sys\nfrom flows.cli import main\n"
        f"rc = main({list(argv)!r})\n"
        f"print(json.dumps([rc] + [m in sys.modules for m in {list(modules)!r}]), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        timeout=300,
    )
    try:
        return proc, json.loads(proc.stderr.rstrip().rpartition("\n")[2])
    except ValueError:
        raise AssertionError(f"the CLI did not finish: {proc.stderr[-2000:]}") from None


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (chosen by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries, found as infra/postgres.sh finds them
    ($PG_BIN, the newest Debian /usr/lib/postgresql/*/bin, `initdb` on PATH), or None."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    debian = [
        d
        for d in Path("/usr/lib/postgresql").glob("*/bin")
        if d.parent.name.isdigit() and (d / "initdb").exists()
    ]
    if debian:
        return max(debian, key=lambda d: int(d.parent.name))
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass(frozen=True)
class PostgresCluster:
    url: str  # postgresql+psycopg2://unlearnflow:...@127.0.0.1:PORT/unlearnflow
    state_dir: Path  # infra/postgres.sh's --data-dir (PG_DATA_DIR)
    port: int


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (infra/postgres.sh: initdb, a database
    `unlearnflow` and a password user), fsync off; destroyed at the end of the session."""
    pg_bin = postgres_bin()
    if pg_bin is None:
        pytest.skip("no PostgreSQL binaries (initdb) installed: apt-get install postgresql")
    # Not under the session dir or pytest's tmp dirs (mode 700, root's when the tests run as
    # root): the server runs as `postgres` then and must reach its state dir.
    base = Path(tempfile.mkdtemp(prefix="ulf-pg-"))
    base.chmod(0o755)
    state = base / "pg"  # infra/postgres.sh creates it, owned by the server's user
    script = str(REPO / "infra" / "postgres.sh")
    env = {
        **os.environ,
        "PG_BIN": str(pg_bin),
        "PG_OPTIONS": "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
    }
    port = free_port()
    try:
        proc = subprocess.run(
            ["bash", script, "start", "--port", str(port), "--data-dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            pytest.fail(f"infra/postgres.sh start failed:\n{proc.stderr}", pytrace=False)
        yield PostgresCluster(proc.stdout.strip().splitlines()[-1], state, port)
    finally:
        subprocess.run(
            ["bash", script, "destroy", "--data-dir", str(state)],
            env=env,
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """SQLAlchemy URL of the throw-away cluster's database (tests using it: mark `cluster`)."""
    return postgres_cluster.url


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
