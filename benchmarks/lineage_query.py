"""``unlearn lineage sample`` against a large generated history.

Generates, in a temporary folder, an MLflow SQLite store with its registry and the request
ledger beside it (no training): ``--requests`` done requests, each forgetting ``--ids`` sample
ids (ledger rows, events and the forgotten-id index inserted directly), and one registered
version per request (an approximate version chained to its parent) with an exact retrain
every ``--retrain-every`` requests. Then times ``lineage sample`` for a sample forgotten
mid-way (the function, warm, best of ``--repeat``; and the whole CLI in a fresh process:
interpreter start, imports, queries, printing).

    python -m benchmarks.lineage_query [--requests 1000] [--ids 10] [--retrain-every 100] \
        [--compare-tree DIR]

``--compare-tree DIR``: also time the CLI of another checkout (e.g. ``git archive <commit> |
tar -x -C DIR``) on the same ledger, best of ``--repeat`` fresh processes each, and print
the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--ids", type=int, default=10, help="forgotten ids per request")
    ap.add_argument("--retrain-every", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compare-tree", help="another checkout whose CLI is timed alike")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from tasks.ledger import Ledger
    from tasks.lineage import sample_lineage

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
        ledger = Ledger(uri)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = sample_lineage(uri, ledger, MODEL, sample)
            times.append(time.perf_counter() - t)
        ledger.close()
        print(
            f"lineage sample {sample}: forgotten by {out['forgotten_by'][0]['request_id']}; "
            f"{len(out['trained_with'])} versions trained with it, {len(out['unlearned_in'])} "
            f"unlearned it, {len(out['trained_without'])} without"
        )
        print(f"sample_lineage() warm: best {min(times):.3f}s, first {times[0]:.3f}s")

        def fresh(tree: Path) -> tuple[float, float]:
            """Best wall time and best CPU time (user + system, of the process and its
            children: less sensitive to other load on the machine) of --repeat fresh CLI
            processes run from ``tree`` (with the params file of that tree, pointed at the
            generated stores)."""
            params = yaml.safe_load((tree / "params.yaml").read_text())
            params["tracking"]["mlflow_uri"] = uri
            params["service"]["model_name"] = MODEL
            path = root / f"params-{abs(hash(str(tree)))}.yaml"
            path.write_text(yaml.safe_dump(params))
            cli = [sys.executable, "-m", "flows.cli", "lineage", "sample", sample, "--json"]
            cli += ["--params", str(path)]
            walls, cpus = [], []
            env = {**os.environ, "PYTHONPATH": str(tree)}
            for _ in range(args.repeat):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                proc = subprocess.run(cli, cwd=tree, capture_output=True, text=True, env=env)
                walls.append(time.perf_counter() - t)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                if proc.returncode != 0:
                    raise SystemExit(f"{tree}: {proc.stderr[-3000:]}")
                assert json.loads(proc.stdout)["sample_id"] == sample
            return min(walls), min(cpus)

        wall, cpu = fresh(REPO)
        floor_cmd = [sys.executable, "-c", "import flows.cli, tasks.lineage, mlflow"]
        t = time.perf_counter()
        subprocess.run(floor_cmd, cwd=REPO, check=True, capture_output=True)
        floor = time.perf_counter() - t
        print(
            f"unlearn lineage sample (CLI, fresh process, best of {args.repeat}): {wall:.2f}s "
            f"wall, {cpu:.2f}s CPU"
        )
        print(
            f"  of which interpreter start + imports (mlflow, sqlalchemy; no torch, no prefect): "
            f"{floor:.2f}s; the rest (params, queries, printing): {wall - floor:.2f}s"
        )
        if args.compare_tree:
            other, other_cpu = fresh(Path(args.compare_tree).resolve())
            print(
                f"the same command from {args.compare_tree}: {other:.2f}s wall, "
                f"{other_cpu:.2f}s CPU (this tree / that one: wall {wall / other:.2f}, "
                f"CPU {cpu / other_cpu:.2f})"
            )
        goal = "met" if min(times) < 2.0 and wall < 2.0 else "NOT met"
        print(f"goal < 2 s for the query over {args.requests} requests: {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
