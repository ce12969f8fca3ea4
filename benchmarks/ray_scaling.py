"""Ray scaling of the many-model engine: 1 worker vs 2 workers on this machine, and the
orchestration overhead (CPU-slot time not spent inside the ensemble trainer).

    python -m benchmarks.ray_scaling --models 512 --chunk-size 64 --epochs 30
    python -m benchmarks.ray_scaling --gpus-per-task 0.5 --workers 1,2   # on a GPU machine
    python -m benchmarks.ray_scaling --cpu-block-mib 0   # each chunk's 64 models in one loop

Each configuration trains the same M digits-MLP subset models (alpha 0.5) into a fresh
store through ``tasks.attribution.run_store`` on a local Ray with that many CPUs, one torch
thread per task; with ``--gpus-per-task g`` each chunk task also asks for g GPUs
(``ray.gpus_per_task``) and trains on CUDA, so "workers" is then the number of chunk tasks
sharing the card(s). The speed-up column divides by the first row. Trainer seconds are the
chunks' wall-clock time inside the trainer, summed; trainer CPU seconds the CPU time their
processes got there: where the first exceeds the second, the tasks waited for a core (other
jobs, or more runnable threads than cores); where CPU seconds grow with the workers, each
computes slower beside the other (shared caches, memory bandwidth).
"""

from __future__ import annotations

import argparse
import os
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
    ap.add_argument(
        "--cpu-block-mib",
        type=float,
        default=RayConfig().cpu_block_mib,
        help="ray.cpu_block_mib of the chunk tasks (0: each chunk's models in one loop)",
    )
    args = ap.parse_args()
    X, y, targets, target_y, target_ids, target_split = load_split("digits")
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
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
                workers,
                wall,
                args.models / wall,
                stats["overhead_fraction"],
                stats["trainer_seconds"],
                stats["trainer_cpu_seconds"],
            )
        )
        print(f"{workers} worker(s): {wall:.1f}s", file=sys.stderr)
    print(
        f"python benchmarks/ray_scaling.py --models {args.models} --chunk-size {args.chunk_size} "
        f"--epochs {args.epochs} --gpus-per-task {args.gpus_per_task:g} --cpu-block-mib "
        f"{args.cpu_block_mib:g}   (torch "
        f"{torch.__version__}, ray {ray.__version__}, load average at end "
        f"{os.getloadavg()[0]:.2f})"
    )
    print(
        "| workers | wall s | models/s | speed-up vs 1 | overhead | trainer s (sum) "
        "| trainer CPU s (sum) |"
    )
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2]
    for w, wall, mps, over, inside, cpu in rows:
        print(
            f"| {w} | {wall:.1f} | {mps:.2f} | {mps / base:.2f}x | {100 * over:.1f}% | {inside:.1f} "
            f"| {cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
