"""``unlearn lineage sample`` against a large generated history.

Generates, in a temporary folder, an MLflow SQLite store with its registry and the request
ledger beside it (no training): ``--requests`` done requests, each forgetting ``--ids`` sample
ids (ledger rows, events and the forgotten-id index inserted directly), and one registered
version per request (an approximate version chained to its parent) with an exact retrain
every ``--retrain-every`` requests. Then starts ``infra/mlflow-server.sh`` on 127.0.0.1 over
that store (``--auth basic``: with MLflow's basic-auth app, as a team runs it) and times
``lineage sample`` for a sample forgotten mid-way, side by side:

- against the SQLite store (``sqlite:///``: MLflow's registry tables read with ``sqlite3``,
  tasks/mlflow_sqlite.py, no ``import mlflow``; the MLflow client for comparison) and
  against the server (``http://``: MLflow's REST API read with the standard library);
- the function, warm (best of ``--repeat``), and the whole CLI in a fresh process
  (interpreter start, imports, queries, printing; best and median of ``--repeat`` rounds,
  each round running every configuration once in turn, so that a change in the load of a
  shared machine hits them alike).

The REST and client answers are checked equal before anything is timed.

    python -m benchmarks.lineage_query [--requests 1000] [--ids 10] [--retrain-every 100] \
        [--auth none|basic] [--auth-function once|mlflow] [--baseline-auth-function once|mlflow] \
        [--compare-tree DIR]

``--auth-function``: how the basic-auth server checks passwords (``MLFLOW_AUTH_FUNCTION`` of
``infra/mlflow-server.sh``): ``once`` a request (its default) or ``mlflow`` (MLflow's own
function, which checks three times a request). ``--baseline-auth-function``: a second
basic-auth server over the same store with that check, its CLI timed in the same rounds.

``--compare-tree DIR``: also time the CLI of another checkout (e.g. ``git archive <commit> |
tar -x -C DIR``) on the same stores, in the same rounds, and print the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = "bench-digits"


def generate(uri: str, n_requests: int, n_ids: int, retrain_every: int) -> dict:
    import sqlalchemy as sa
    from mlflow import MlflowClient

    from tasks.ledger import Ledger, events_table, forgotten_table, models_table, requests_table

    ledger = Ledger(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(MODEL)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    requests, events, forgotten = [], [], []
    for i in range(n_requests):
        rid = f"req-{i:05d}"
        at = (t0 + timedelta(minutes=15 * i)).isoformat()
        requests.append(
            dict(
                request_id=rid,
                model_name=MODEL,
                digest=f"{i:064x}",
                content=json.dumps({"request_id": rid}),
                status="done",
                submitted_at=at,
                updated_at=at,
                parent_version=None,
                produced_version=None,
            )
        )
        events += [
            dict(request_id=rid, from_status=None, to_status="pending", at=at, reason="submitted"),
            dict(request_id=rid, from_status="pending", to_status="processing", at=at, reason="c"),
            dict(request_id=rid, from_status="processing", to_status="done", at=at, reason="ok"),
        ]
        forgotten += [
            dict(
                sample_id=f"digits-{i * n_ids + j:06d}",
                request_id=rid,
                model_name=MODEL,
                at=at,
                tombstone_index=i * n_ids + j,
            )
            for j in range(n_ids)
        ]
    with ledger.engine.begin() as conn:
        conn.execute(models_table.insert().values(model_name=MODEL, created_at=t0.isoformat()))
        conn.execute(requests_table.insert(), requests)
        conn.execute(events_table.insert(), events)
        for k in range(0, len(forgotten), 5000):
            conn.execute(forgotten_table.insert(), forgotten[k : k + 5000])
        n = conn.execute(sa.select(sa.func.count()).select_from(forgotten_table)).scalar()
    ledger.close()

    t = time.perf_counter()
    version = client.create_model_version(
        MODEL, "file:///dev/null", tags={"kind": "exact", "tombstones_count": "0"}
    ).version
    for i in range(n_requests):
        rid = f"req-{i:05d}"
        if retrain_every and i and i % retrain_every == 0:
            version = client.create_model_version(
                MODEL,
                "file:///dev/null",
                tags={"kind": "exact", "tombstones_count": str(i * n_ids)},
            ).version
        version = client.create_model_version(
            MODEL,
            "file:///dev/null",
            tags={
                "kind": "approximate",
                "parent_version": str(version),
                "request_ids": rid,
                "method": "fisher_diagonal",
            },
        ).version
    client.set_registered_model_alias(MODEL, "production", str(version))
    return {
        "forgotten_rows": n,
        "versions": int(version),
        "registry_seconds": time.perf_counter() - t,
    }


@contextlib.contextmanager
def serve(
    backend_uri: str,
    data_dir: Path,
    auth: bool = False,
    timeout: float = 180,
    auth_function: str = "once",
) -> Iterator[tuple[str, dict[str, str]]]:
    """``infra/mlflow-server.sh`` over ``backend_uri`` on a free port of 127.0.0.1 (one
    worker, no job runner); with ``auth``, MLflow's basic-auth app with a random admin
    password. Yields the server URL and the client environment (credentials) to use; stops
    the server (its whole process group) on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_DATA_DIR=str(data_dir),
        MLFLOW_BACKEND_STORE_URI=backend_uri,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    client_env: dict[str, str] = {}
    if auth:
        password = secrets.token_urlsafe(16)
        env.update(
            MLFLOW_AUTH="basic",
            MLFLOW_AUTH_ADMIN_PASSWORD=password,
            MLFLOW_AUTH_FUNCTION=auth_function,
        )
        client_env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    log = data_dir / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", str(REPO / "infra" / "mlflow-server.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after {timeout:.0f}s: {log.read_text()}"
                )
            time.sleep(0.3)
        yield url, client_env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--ids", type=int, default=10, help="forgotten ids per request")
    ap.add_argument("--retrain-every", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--auth", choices=("none", "basic"), default="basic", help="the server's auth app"
    )
    ap.add_argument(
        "--auth-function",
        choices=("once", "mlflow"),
        default="once",
        help="the basic-auth server's password check (MLFLOW_AUTH_FUNCTION)",
    )
    ap.add_argument(
        "--baseline-auth-function",
        choices=("once", "mlflow"),
        help="with --auth basic: a second server over the same store with this password "
        "check, timed interleaved with the first",
    )
    ap.add_argument("--compare-tree", help="another checkout whose CLI is timed alike")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from tasks.ledger import Ledger
    from tasks.lineage import sample_lineage

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="lineage-bench-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        t = time.perf_counter()
        info = generate(uri, args.requests, args.ids, args.retrain_every)
        print(
            f"generated {args.requests} done requests, {info['forgotten_rows']} forgotten ids, "
            f"{info['versions']} registered versions in {time.perf_counter() - t:.1f}s"
        )
        sample = f"digits-{(args.requests // 2) * args.ids + 3:06d}"
        t = time.perf_counter()
        basic = args.auth == "basic"
        with contextlib.ExitStack() as servers:
            url, creds = servers.enter_context(
                serve(uri, root / "server", auth=basic, auth_function=args.auth_function)
            )
            print(f"mlflow server ({args.auth} auth) up in {time.perf_counter() - t:.1f}s")
            baseline = None
            if basic and args.baseline_auth_function:
                baseline = servers.enter_context(
                    serve(
                        uri,
                        root / "server-baseline",
                        auth=True,
                        auth_function=args.baseline_auth_function,
                    )
                )
            saved = {k: os.environ.get(k) for k in creds}
            os.environ.update(creds)
            ledger = Ledger(uri)
            warm: dict[str, float] = {}
            answers = {}
            for name, where, via in (
                ("sqlite", uri, "auto"),
                ("sqlite-client", uri, "client"),
                ("server-rest", url, "rest"),
                ("server-client", url, "client"),
            ):
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    answers[name] = sample_lineage(where, ledger, MODEL, sample, via=via)
                    times.append(time.perf_counter() - t)
                warm[name] = min(times)
            ledger.close()
            # one request's round trip (the basic-auth app checks the password on each):
            # best of --repeat
            from tasks import mlflow_rest

            def round_trip(server_url: str, server_creds: dict[str, str]) -> float:
                server = mlflow_rest.Server.from_env(server_url, {**os.environ, **server_creds})
                best = float("inf")
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    mlflow_rest.model_aliases(server, MODEL)
                    best = min(best, time.perf_counter() - t)
                return best

            trips = {"server": round_trip(url, creds)}
            if baseline is not None:
                trips["baseline"] = round_trip(*baseline)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            out = answers["sqlite"]
            assert (
                answers["server-rest"] == out == answers["server-client"]
                and answers["sqlite-client"] == out
            ), "answers differ"
            print(
                f"lineage sample {sample}: forgotten by {out['forgotten_by'][0]['request_id']}; "
                f"{len(out['trained_with'])} versions trained with it, "
                f"{len(out['unlearned_in'])} unlearned it, {len(out['trained_without'])} "
                "without (the same answer from the sqlite tables, the client on sqlite, REST "
                "and the client against the server)"
            )

            def fresh_cli(tree: Path, mlflow_uri: str, env_creds: dict[str, str]):
                """A fresh CLI process run from ``tree`` (with the params file of that tree,
                pointed at the generated stores): returns its wall and CPU time (user +
                system of the process: less sensitive to other load on the machine; the
                server's time is not in it), after checking its answer."""
                params = yaml.safe_load((tree / "params.yaml").read_text())
                params["tracking"]["mlflow_uri"] = mlflow_uri
                params["service"]["model_name"] = MODEL
                params["service"]["ledger_url"] = uri
                path = root / f"params-{abs(hash((str(tree), mlflow_uri)))}.yaml"
                path.write_text(yaml.safe_dump(params))
                cli = [sys.executable, "-m", "flows.cli", "lineage", "sample", sample, "--json"]
                cli += ["--params", str(path)]
                env = {**os.environ, **env_creds, "PYTHONPATH": str(tree)}
                env.pop("MLFLOW_TRACKING_URI", None)

                def run() -> tuple[float, float]:
                    before = _cpu_children()
                    t = time.perf_counter()
                    proc = subprocess.run(cli, cwd=tree, capture_output=True, text=True, env=env)
                    wall, cpu = time.perf_counter() - t, _cpu_children() - before
                    if proc.returncode != 0:
                        raise SystemExit(f"{tree}: {proc.stderr[-3000:]}")
                    assert json.loads(proc.stdout) == json.loads(json.dumps(out, default=str))
                    return wall, cpu

                return run

            def interleaved(runs: dict) -> dict[str, tuple[float, float, float]]:
                """--repeat rounds, each running every configuration once in turn (so a
                change in the machine's load hits them alike): best wall, best CPU and
                median wall of each."""
                got: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
                for _ in range(args.repeat):
                    for key, run in runs.items():
                        got[key].append(run())
                return {
                    k: (
                        min(w for w, _ in v),
                        min(c for _, c in v),
                        sorted(w for w, _ in v)[len(v) // 2],
                    )
                    for k, v in got.items()
                }

            def floor(modules: str) -> float:
                best = float("inf")
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    subprocess.run(
                        [sys.executable, "-c", f"import {modules}"], cwd=REPO, check=True
                    )
                    best = min(best, time.perf_counter() - t)
                return best

            runs = {"sqlite": fresh_cli(REPO, uri, {}), "server": fresh_cli(REPO, url, creds)}
            if baseline is not None:
                runs["baseline"] = fresh_cli(REPO, *baseline)
            if args.compare_tree:
                tree = Path(args.compare_tree).resolve()
                runs["other-sqlite"] = fresh_cli(tree, uri, {})
                runs["other-server"] = fresh_cli(tree, url, creds)
            rows = interleaved(runs)
            no_query = floor("flows.cli, tasks.lineage, tasks.ledger")
            floors = {"sqlite": no_query, "server": no_query}
            other = None
            if args.compare_tree:
                other = {"sqlite": rows["other-sqlite"], "server": rows["other-server"]}
        auth = "no auth" if not basic else f"auth: {args.auth_function}"
        print(
            f"\n{'lineage sample over ' + str(args.requests) + ' requests':<44}"
            f"{'sqlite (tables)':>24}{'server (' + auth + ')':>22}"
        )
        print(
            f"{'sample_lineage(), warm, best of ' + str(args.repeat):<44}"
            f"{warm['sqlite']:>23.3f}s{warm['server-rest']:>21.3f}s"
            f"   (MLflow client on sqlite: {warm['sqlite-client']:.3f}s, "
            f"on the server: {warm['server-client']:.3f}s)"
        )
        print(
            f"{'unlearn lineage sample, fresh process, wall':<44}"
            f"{rows['sqlite'][0]:>23.2f}s{rows['server'][0]:>21.2f}s"
        )
        print(
            f"{'  median of ' + str(args.repeat) + ' fresh processes, wall':<44}"
            f"{rows['sqlite'][2]:>23.2f}s{rows['server'][2]:>21.2f}s"
        )
        print(
            f"{'  its CPU time (user + system)':<44}"
            f"{rows['sqlite'][1]:>23.2f}s{rows['server'][1]:>21.2f}s"
        )
        print(
            f"{'  interpreter start + imports (no query)':<44}"
            f"{floors['sqlite']:>23.2f}s{floors['server']:>21.2f}s"
        )
        print(
            f"{'  one REST round trip to the server':<44}{'-':>24}{trips['server']:>21.3f}s"
            "   (2 per query; best of " + str(args.repeat) + ")"
        )
        if baseline is not None:
            b = rows["baseline"]
            print(
                f"{'server (auth: ' + args.baseline_auth_function + '), same rounds:':<44}"
                f"{'':>24}{b[0]:>21.2f}s   (fresh process: best wall; median {b[2]:.2f}s, "
                f"CPU {b[1]:.2f}s; one round trip {trips['baseline']:.3f}s)"
            )
        if other is not None:
            print(
                f"{'the same CLI from ' + args.compare_tree + ', wall':<44}"
                f"{other['sqlite'][0]:>23.2f}s{other['server'][0]:>21.2f}s"
            )
            print(
                f"{'  this tree / that one (wall)':<44}"
                f"{rows['sqlite'][0] / other['sqlite'][0]:>24.2f}"
                f"{rows['server'][0] / other['server'][0]:>22.2f}"
            )
        for name in ("sqlite", "server") + (("baseline",) if baseline is not None else ()):
            goal = "met" if rows[name][0] < 2.0 else "NOT met"
            print(f"goal: a fresh `unlearn lineage sample` under 2 s ({name}, best): {goal}")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
