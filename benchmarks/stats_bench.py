"""Sharded statistics: throughput with 1 vs 2 Ray workers, and peak memory vs samples.

    python -m benchmarks.stats_bench throughput --n 4000 --shards 8
    python -m benchmarks.stats_bench memory --sizes 1000,4000,16000

``throughput``: Fashion-MNIST training samples (seeded subsample) written as Parquet shards;
a local Ray with 2 CPUs; the Fisher diagonal (``true_expected``, the CNN) and the activation
Gram matrices (the CNN) computed shard by shard with at most 1, then 2, tasks in flight
(1 torch thread per task). Prints samples/s and the 2-vs-1 ratio, measured in one run.

``memory``: for each N, a fresh subprocess streams N samples (shards of 1,000 rows read one
at a time) through the activation statistics of the CNN and reports its peak RSS above the
resident size after set-up (imports, model, one Parquet read); the same for the reference that stacks all activations and takes
their SVD (``stacked``), which grows with N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import load_split
from pipeline_lib.config import ModelConfig, RayConfig, to_dict
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.store import reduce_sums, write_shards

SHAPE = (1, 28, 28)
CNN = ModelConfig(name="cnn", channels=(16, 32))


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X, y, *_ = load_split("fashion-mnist")
    rows = np.sort(np.random.default_rng(seed).choice(len(y), n, replace=n > len(y)))
    return np.array([f"fm-{i}" for i in range(n)]), X[rows], y[rows]


def throughput(args) -> None:
    import ray

    from tasks.stats import run_shards

    ids, X, y = _data(args.n)
    model = build_model(CNN, SHAPE, 10, seed=0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = RayConfig(num_cpus=2, cpus_per_task=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_shards(ids, X, y, Path(tmp) / "s", args.shards)
            jobs = {
                "fisher (true_expected)": (
                    "fisher",
                    {"kind": "true_expected", "batch_size": 256, "seed": 0},
                ),
                "activations (Gram)": ("activations", {"batch_size": 256}),
            }
            # warm-up: start the worker processes and import torch in them
            run_shards(
                "activations",
                model.state_dict(),
                to_dict(CNN),
                SHAPE,
                10,
                paths[:2],
                {"batch_size": 256},
                cfg,
                2,
            )
            print(f"{args.n} Fashion-MNIST samples, {len(paths)} shards, CNN, local Ray (2 CPUs)")
            print("| statistic | 1 worker (samples/s) | 2 workers (samples/s) | speed-up |")
            print("|---|---|---|---|")
            for label, (kind, opts) in jobs.items():
                rate, sums = {}, {}
                for workers in (1, 2):
                    out = run_shards(
                        kind, model.state_dict(), to_dict(CNN), SHAPE, 10, paths, opts, cfg, workers
                    )
                    rate[workers] = out["samples_per_second"]
                    sums[workers] = reduce_sums(out["parts"])[0]
                same = all(torch.allclose(sums[1][k], sums[2][k], rtol=1e-5) for k in sums[1])
                print(
                    f"| {label} | {rate[1]:.1f} | {rate[2]:.1f} | {rate[2] / rate[1]:.2f}× "
                    f"{'(same sums)' if same else '(SUMS DIFFER)'} |",
                    flush=True,
                )
    finally:
        ray.shutdown()


def _peak_mib() -> float:
    """VmHWM, the peak resident size since the last :func:`_reset_peak` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _current_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def memory_child(n: int, mode: str, shard_dir: str) -> None:
    """Runs in a fresh process: prints JSON with peak RSS growth during the statistic."""
    from pipeline_lib.stats.activations import (
        activation_shard_grams,
        decompose_grams,
        stacked_activations,
    )
    from pipeline_lib.stats.store import read_shard

    torch.set_num_threads(1)
    model = build_model(CNN, SHAPE, 10, seed=0)
    paths = sorted(Path(shard_dir).glob("shard-*.parquet"))
    need = n // 1000
    read_shard(paths[0])  # imports and first Parquet read before the baseline
    _reset_peak()
    base = _current_mib()
    t0 = time.perf_counter()
    if mode == "gram":
        grams, count = reduce_sums(activation_shard_grams(model, p, 256) for p in paths[:need])
        decompose_grams(grams)
    else:
        X = np.concatenate([read_shard(p)[1] for p in paths[:need]])
        stacked = stacked_activations(model, torch.from_numpy(X))
        for A in stacked.values():
            torch.linalg.svd(A, full_matrices=False)
    print(
        json.dumps(
            {
                "n": n,
                "mode": mode,
                "peak_growth_mib": _peak_mib() - base,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


def memory(args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    ids, X, y = _data(max(sizes))
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(ids, X, y, Path(tmp) / "s", max(sizes) // 1000)
        print(
            "| samples | Gram route: peak RSS growth (MiB) | stacked + SVD: peak RSS growth (MiB) |"
        )
        print("|---|---|---|")
        for n in sizes:
            row = {}
            for mode in ("gram", "stacked"):
                if mode == "stacked" and n > args.max_stacked:
                    row[mode] = None
                    continue
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.stats_bench",
                        "_child",
                        str(n),
                        mode,
                        str(Path(tmp) / "s"),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            g, s = row["gram"], row["stacked"]
            stacked = f"{s['peak_growth_mib']:.0f} ({s['seconds']:.1f}s)" if s else "not run"
            print(
                f"| {n} | {g['peak_growth_mib']:.0f} ({g['seconds']:.1f}s) | {stacked} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--n", type=int, default=4000)
    t.add_argument("--shards", type=int, default=8)
    m = sub.add_parser("memory")
    m.add_argument("--sizes", default="1000,4000,16000")
    m.add_argument("--max-stacked", type=int, default=16000)
    c = sub.add_parser("_child")
    c.add_argument("n", type=int)
    c.add_argument("mode")
    c.add_argument("shard_dir")
    args = ap.parse_args(argv)
    if args.cmd == "throughput":
        throughput(args)
    elif args.cmd == "memory":
        memory(args)
    else:
        memory_child(args.n, args.mode, args.shard_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
