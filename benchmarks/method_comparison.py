"""The issue-4 comparison table: every method vs N oracles (KLoM, accuracy, MIA, cost).

    python -m benchmarks.method_comparison --data digits --fractions 0.1,0.01 --models 20 \
        --subset-models 1000 --workdir /tmp/bench-digits
    python -m benchmarks.method_comparison --data fashion-mnist --fractions 0.01 --models 20 \
        --subset-models 1000 --epochs 10 --max-train 20000 --max-test 2000 \
        --workdir /tmp/bench-fmnist

Runs the real ``evaluate`` flow (Prefect, DVC stages, MLflow in the work directory, local
Ray) in a scratch DVC project: N originals and N oracles through the many-model engine, M
subset models for DMM, ``oracle_matching.n_oracles`` extra oracles for OM, every original
unlearned by every method. Stores live in ``--workdir`` and are reused by later runs (the
originals and the subset models are shared by all forget fractions). Prints each table and
the DMM checks: forget-KLoM P95 ÷ noise floor, rank among methods, time ÷ retraining.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline_lib.config import apply_overrides

REPO = Path(__file__).resolve().parents[1]


def scratch_project(root: Path, params: dict) -> Path:
    """A DVC project like the repository's (dvc.yaml + stage code) with these params."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    if (root / "pipeline_lib").exists():
        shutil.rmtree(root / "pipeline_lib")
    shutil.copytree(
        REPO / "pipeline_lib", root / "pipeline_lib", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "requests").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (root / ".dvc").exists():
        subprocess.run(
            [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True
        )
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    ap.add_argument("--fractions", default="0.1,0.01")
    ap.add_argument("--models", type=int, default=20, help="N originals and N oracles")
    ap.add_argument("--subset-models", type=int, default=1000, help="M subset models for DMM")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml)")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated (default: all registered)")
    ap.add_argument("--workdir", default="/tmp/unlearnflow-method-comparison")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter"
    )
    ap.add_argument("--tag", default="", help="suffix of the request id (separate reports)")
    args = ap.parse_args()

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    root = Path(args.workdir).resolve()
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / ".prefect-results"))

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(name=args.data, max_train=args.max_train, max_test=args.max_test)
    if args.epochs:
        params["train"]["epochs"] = args.epochs
    params["attribution"].update(n_models=args.subset_models, chunk_size=50, lds_heldout=0)
    params["evaluate"]["n_models"] = args.models
    params["tracking"].update(mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", dvc_root=str(root))
    params["request"]["file"] = "requests/bench.yaml"
    params = apply_overrides(
        params, {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    )
    scratch_project(root, params)

    from flows.evaluate import default_methods, evaluate_flow
    from pipeline_lib.comparison import markdown_table

    methods = args.methods.split(",") if args.methods else default_methods()
    for fraction in [float(f) for f in args.fractions.split(",")]:
        rid = f"bench-{args.data}-{fraction:g}-n{args.models}-m{args.subset_models}{args.tag}"
        (root / "requests" / "bench.yaml").write_text(
            f"request_id: {rid}\nreason: benchmark\nforget:\n  fraction: {fraction}\n  seed: 0\n"
        )
        t0 = time.perf_counter()
        result = evaluate_flow(params_path=str(root / "params.yaml"), methods=methods)
        wall = time.perf_counter() - t0
        rows = {r["method"]: r for r in result["rows"]}
        print(
            f"\n## {args.data}, random {fraction:.0%} forget set, N = {args.models}, M = {args.subset_models} ({wall:.0f}s wall)\n"
        )
        print(markdown_table(result["rows"]))
        floor = result["floor"]["forget"]["p95"]
        ranked = sorted(
            (r["klom_forget_p95"], m) for m, r in rows.items() if m != "oracle (retrain)"
        )
        if "dmm" in rows:
            d = rows["dmm"]
            print(
                f"DMM forget-KLoM P95 {d['klom_forget_p95']:.3f} = {d['klom_forget_p95'] / floor:.2f}x "
                f"the noise floor {floor:.3f} (goal <= 2x); rank by forget P95: "
                f"{[m for _, m in ranked].index('dmm') + 1} of {len(ranked)} "
                f"({', '.join(m for _, m in ranked)}); time / retrain {d['time_over_retrain']:.4f} "
                f"(goal <= 0.05)"
            )
        print(f"files: {result['files']['comparison.md']}")


if __name__ == "__main__":
    sys.exit(main())
