"""Fashion-MNIST attribution throughput: models per hour for MLP subset models (alpha 0.5)
on this machine, and the projected wall time of 10,000 models on a 64-CPU Ray cluster.

    python benchmarks/fmnist_throughput.py --models 16 --chunk-size 8 --epochs 5

Trains M models through the real engine (local Ray, one torch thread per task, 2 workers)
on the 60,000 training images and records their outputs on all 70,000 points. The
projection assumes throughput scales with CPUs as measured from 1 to 2 workers in
benchmarks/ray_scaling.py (printed with its assumption).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch

from benchmarks._common import load_split, spec_for
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.config import RayConfig
from tasks.attribution import run_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hidden", default="128,128")
    ap.add_argument("--target-models", type=int, default=10_000)
    ap.add_argument("--target-cpus", type=int, default=64)
    args = ap.parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    X, y, targets, target_y, target_ids, target_split = load_split("fashion-mnist")
    spec = spec_for(len(X), args.models, args.chunk_size, args.epochs, hidden=hidden)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        store = AttributionStore(d, spec)
        store.initialise(target_ids, target_split, target_y)
        t0 = time.perf_counter()
        stats = run_store(store, X, y, targets, RayConfig(num_cpus=args.workers, cpus_per_task=1))
        wall = time.perf_counter() - t0
        store.check()
        _, _, outputs = store.load()
    ray.shutdown()
    acc = (outputs.astype("float32").argmax(-1)[:, len(X) :] == target_y[len(X) :]).mean()
    per_hour = args.models / wall * 3600
    per_cpu_hour = per_hour / args.workers
    inside_per_model = stats["trainer_seconds"] / args.models
    projected_h = args.target_models / (per_cpu_hour * args.target_cpus)
    print(
        f"python benchmarks/fmnist_throughput.py --models {args.models} --chunk-size {args.chunk_size} "
        f"--epochs {args.epochs} --workers {args.workers} --hidden {args.hidden}   (torch {torch.__version__})"
    )
    print(
        f"train {len(X)} images, alpha {spec.alpha}, {len(targets)} targets, MLP {hidden}, {args.epochs} epochs"
    )
    print(
        f"wall {wall:.1f}s for {args.models} models on {args.workers} workers -> {per_hour:.1f} models/hour "
        f"({per_cpu_hour:.1f} per CPU-hour; {inside_per_model:.1f} s of trainer time per model)"
    )
    print(f"mean test accuracy of the subset models: {100 * acc:.2f}%")
    print(f"orchestration overhead {100 * stats['overhead_fraction']:.1f}%")
    print(
        f"projection: {args.target_models} models on {args.target_cpus} CPUs at {per_cpu_hour:.1f} models per "
        f"CPU-hour (linear scaling assumed) = {projected_h:.2f} h"
    )


if __name__ == "__main__":
    main()
