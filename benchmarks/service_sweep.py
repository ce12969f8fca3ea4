"""The deletion service on digits: 10 queued requests, one sweep.

Measures, in one run on a fresh project in a temporary folder (real Prefect temporary API,
MLflow on SQLite with its registry, DVC):

- the first production version (an exact training on the prepared data);
- each request's wall time inside the sweep (claim → unlearn from the current production
  version → evaluate → gates → tombstones under DVC → registered version and alias);
- the sweep's own overhead: the sweep's wall time less the first version and the requests;
- an exact retrain on the data minus the 10 requests' tombstones (what each request would
  cost without unlearning), side by side with the mean per-request time.

    python -m benchmarks.service_sweep [--requests 10] [--fraction 0.01] [--method fisher_diagonal]
        [--oracle never] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path, params: dict) -> None:
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(
        REPO / "pipeline_lib", root / "pipeline_lib", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "requests").mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.01, help="forget fraction per request")
    ap.add_argument("--method", default="fisher_diagonal")
    ap.add_argument("--oracle", default="never", choices=("always", "never", "sampled"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="unlearnflow-sweep-bench-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp / "prefect-results")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = tmp / "project"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="sweep-bench", dvc_root=str(root)
    )
    params["unlearn"]["method"] = args.method
    params["service"]["oracle"] = args.oracle
    for item in args.set:
        key, value = item.split("=", 1)
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    make_project(root, params)
    files = []
    for i in range(args.requests):
        doc = {
            "request_id": f"bench-{i:03d}",
            "reason": "benchmark erasure",
            "forget": {"fraction": args.fraction, "seed": 100 + i},
        }
        path = root / "requests" / f"bench-{i:03d}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))

    from flows.cli import main as cli
    from flows.service import retrain_production_flow, sweep_flow
    from tasks.ledger import Ledger

    params_path = str(root / "params.yaml")
    assert cli(["submit", "--params", params_path, *files]) == 0
    t0 = time.perf_counter()
    result = sweep_flow(params_path=params_path)
    sweep_wall = time.perf_counter() - t0
    per_request = [r["seconds"] for r in result["processed"]]
    statuses = [r["status"] for r in result["processed"]]
    ledger = Ledger(f"sqlite:///{root / 'mlflow.db'}")
    rows = ledger.list()
    ledger.close()
    assert len(rows) == args.requests and all(r.status == "done" for r in rows), statuses

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    first = client.get_model_version(params["service"]["model_name"], "1")
    first_run = client.get_run(first.run_id)
    first_wall = (first_run.info.end_time - first_run.info.start_time) / 1000.0
    first_train = float(first_run.data.tags.get("time.train_seconds", "nan"))

    t1 = time.perf_counter()
    exact = retrain_production_flow(params_path=params_path)
    exact_wall = time.perf_counter() - t1
    exact_run = client.get_run(exact["run_id"])
    exact_train = float(exact_run.data.tags.get("time.train_seconds", "nan"))

    mean = sum(per_request) / len(per_request)
    overhead = sweep_wall - first_wall - sum(per_request)
    print()
    print(
        f"digits, {args.requests} queued requests of {args.fraction:.0%} each, method {args.method}, oracle {args.oracle}"
    )
    print(f"{'':<34}{'seconds':>10}")
    print(
        f"{'first production version (wall)':<34}{first_wall:>10.2f}   training {first_train:.2f}"
    )
    for r, s in zip(result["processed"], per_request, strict=True):
        print(
            f"{'  ' + r['request_id'] + ' v' + str(r['parent_version']) + '->v' + str(r['produced_version']):<34}{s:>10.2f}"
        )
    print(f"{'per request, mean':<34}{mean:>10.2f}")
    print(f"{'sweep wall':<34}{sweep_wall:>10.2f}")
    print(f"{'sweep overhead':<34}{overhead:>10.2f}   ({overhead / sweep_wall:.1%} of the sweep)")
    print(f"{'exact retrain (wall)':<34}{exact_wall:>10.2f}   training {exact_train:.2f}")
    print(f"per-request time / exact retrain wall: {mean / exact_wall:.2f}")
    print(f"per-request time / exact retrain training: {mean / exact_train:.2f}")
    print(f"(project left in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
