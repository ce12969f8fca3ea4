"""Ray scaling of the many-model engine: 1 worker vs 2 workers on this machine, and the
orchestration overhead (CPU-slot time not spent inside the ensemble trainer).

    python -m benchmarks.ray_scaling --models 512 --chunk-size 64 --epochs 30
    python -m benchmarks.ray_scaling --gpus-per-task 0.5 --workers 1,2   # on a GPU machine
    python -m benchmarks.ray_scaling --cpu-block-mib 0   # each chunk's 64 models in one loop
    python -m benchmarks.ray_scaling --repeats 3         # rounds 1,2,1,2,1,2 and the median

Each configuration trains the same M digits-MLP subset models (alpha 0.5) into a fresh
store through ``tasks.attribution.run_store`` on a local Ray with that many CPUs, one torch
thread per task; with ``--gpus-per-task g`` each chunk task also asks for g GPUs
(``ray.gpus_per_task``) and trains on CUDA, so "workers" is then the number of chunk tasks
sharing the card(s). The speed-up column divides by the first row. Trainer seconds are the
chunks' wall-clock time inside the trainer, summed; trainer CPU seconds the CPU time their
processes got there: where the first exceeds the second, the tasks waited for a core (other
jobs, or more runnable threads than cores); where CPU seconds grow with the workers, each
computes slower beside the other (shared caches, memory bandwidth).

On a shared host one run's ratio moves by ±0.3 from minute to minute (BENCHMARKS.md, issue
17). ``--repeats R`` runs R rounds of every worker count, interleaved, so that a slow minute
falls on both sides. Each round's speed-up is against that round's first row, and the median
over rounds is printed with its range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import ray
import torch

from benchmarks._common import load_split, spec_for
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.config import RayConfig
from tasks.attribution import run_store
from tasks.ray_local import init_local


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--gpus-per-task", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of every worker count")
    ap.add_argument(
        "--cpu-block-mib",
        type=float,
        default=RayConfig().cpu_block_mib,
        help="ray.cpu_block_mib of the chunk tasks (0: each chunk's models in one loop)",
    )
    args = ap.parse_args()
    X, y, targets, target_y, target_ids, target_split = load_split("digits")
    if args.repeats < 1:
        sys.exit("benchmarks.ray_scaling: --repeats must be at least 1")
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    for rnd, workers in ((r, w) for r in range(1, args.repeats + 1) for w in counts):
        init_local(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        spec = spec_for(len(X), args.models, args.chunk_size, args.epochs)
        with tempfile.TemporaryDirectory() as d:
            store = AttributionStore(d, spec)
            store.initialise(target_ids, target_split, target_y)
            t0 = time.perf_counter()
            cfg = RayConfig(
                num_cpus=workers,
                cpus_per_task=1,
                gpus_per_task=args.gpus_per_task,
                cpu_block_mib=args.cpu_block_mib,
            )
            stats = run_store(store, X, y, targets, cfg)
            wall = time.perf_counter() - t0
            store.check()
        ray.shutdown()
        rows.append(
            (
                rnd,
                workers,
                wall,
                args.models / wall,
                stats["overhead_fraction"],
                stats["trainer_seconds"],
                stats["trainer_cpu_seconds"],
            )
        )
        print(f"round {rnd}, {workers} worker(s): {wall:.1f}s", file=sys.stderr)
    print(
        f"python benchmarks/ray_scaling.py --models {args.models} --chunk-size {args.chunk_size} "
        f"--epochs {args.epochs} --gpus-per-task {args.gpus_per_task:g} --cpu-block-mib "
        f"{args.cpu_block_mib:g} --repeats {args.repeats}   (torch "
        f"{torch.__version__}, ray {ray.__version__}, load average at end "
        f"{os.getloadavg()[0]:.2f})"
    )
    print(
        "| round | workers | wall s | models/s | speed-up vs the round's first | overhead "
        "| trainer s (sum) | trainer CPU s (sum) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ratios: dict[int, list[float]] = {w: [] for w in counts}
    base = 0.0
    for rnd, w, wall, mps, over, inside, cpu in rows:
        base = mps if w == counts[0] else base
        ratios[w].append(mps / base)
        print(
            f"| {rnd} | {w} | {wall:.1f} | {mps:.2f} | {mps / base:.2f}x | {100 * over:.1f}% "
            f"| {inside:.1f} | {cpu:.1f} |"
        )
    if args.repeats > 1:
        for w in counts[1:]:
            r = sorted(ratios[w])
            print(
                f"{w} workers vs {counts[0]}: median {statistics.median(r):.2f}x over "
                f"{len(r)} rounds (range {r[0]:.2f}x to {r[-1]:.2f}x)"
            )


if __name__ == "__main__":
    main()
