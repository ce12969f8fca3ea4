"""LDS of linear datamodels on digits from M subset models (alpha 0.5), for several M.

    python benchmarks/lds_digits.py --models 1000,4000 --val 100 --test 200 --epochs 30

Trains max(M) + val + test digits-MLP subset models once (Ray, local, 2 CPUs), then for each
M fits datamodels on the first M models, picks the ridge penalty on the `val` models, and
reports LDS (Spearman across the `test` held-out models, averaged over targets) of the
correct-class margins on the test split and on the training split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks._common import load_split, spec_for
from pipeline_lib.attribution.datamodels import fit_datamodels, lds, margins
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.config import RayConfig
from tasks.attribution import run_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1000,4000")
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--chunk-size", type=int, default=100)
    ap.add_argument("--store", help="keep the store here (default: a temporary directory)")
    args = ap.parse_args()
    sizes = [int(m) for m in args.models.split(",")]
    X, y, targets, target_y, target_ids, target_split = load_split("digits")
    n_total = max(sizes) + args.val + args.test
    spec = spec_for(len(X), n_total, args.chunk_size, args.epochs)
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.store or tmp.name)
    store = AttributionStore(root, spec)
    store.initialise(target_ids, target_split, target_y)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    stats = run_store(store, X, y, targets, RayConfig(num_cpus=2, cpus_per_task=1))
    train_s = time.perf_counter() - t0
    ray.shutdown()
    masks, _, outputs = store.load()
    m = margins(outputs.astype(np.float64), target_y)  # (M_total, T)
    val = slice(n_total - args.val - args.test, n_total - args.test)
    test = slice(n_total - args.test, n_total)
    rows = []
    for M in sizes:
        for split_name, cols in (
            ("test", target_split == "test"),
            ("train", target_split == "train"),
        ):
            best = None
            for lam in (1.0, 10.0, 100.0, 1000.0):
                t1 = time.perf_counter()
                dm = fit_datamodels(masks[:M], m[:M][:, cols], lam=lam)
                fit_s = time.perf_counter() - t1
                score = lds(dm, masks[val], m[val][:, cols])
                if best is None or score > best[1]:
                    best = (lam, score, dm, fit_s)
            lam, val_score, dm, fit_s = best
            test_score = lds(dm, masks[test], m[test][:, cols])
            dm_diff = fit_datamodels(masks[:M], m[:M][:, cols], estimator="diff_means")
            diff_score = lds(dm_diff, masks[test], m[test][:, cols])
            rows.append((M, split_name, lam, val_score, test_score, diff_score, fit_s))
            print(f"M={M} {split_name}: lds {test_score:.4f}", file=sys.stderr)
    print(
        f"python benchmarks/lds_digits.py --models {args.models} --val {args.val} --test {args.test} "
        f"--epochs {args.epochs}   (torch {torch.__version__})"
    )
    print(
        f"trained {stats['models_trained']} models in {train_s:.0f}s ({stats.get('models_per_second', 0):.1f} models/s, "
        f"2 Ray workers)"
    )
    print(
        "| M | targets | ridge λ (chosen on val) | LDS val | LDS test (ridge) | LDS test (diff-means) | fit s |"
    )
    print("|---|---|---|---|---|---|---|")
    for M, name, lam, v, t, d, f in rows:
        print(f"| {M} | {name} | {lam:g} | {v:.3f} | {t:.3f} | {d:.3f} | {f:.1f} |")


if __name__ == "__main__":
    main()
