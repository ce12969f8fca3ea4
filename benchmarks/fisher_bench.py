"""Per-sample Fisher-diagonal throughput: vectorised (vmap) vs the Python-loop reference.

Both paths run in one process on the same model and the same real digits data (scikit-learn's
8×8 digits scaled to [0, 1], shape (N, 1, 8, 8), float32). For each Fisher kind and each model
the table gives samples/second of each path (best of ``--repeats`` timed calls after one
warm-up call) and the ratio vectorised ÷ loop, plus the largest absolute difference between
the two on the samples they share (the loop runs on the first ``--n-loop`` samples, the
vectorised path on the first ``--n-vec``; the difference is taken on the first ``--n-loop``).

    python benchmarks/fisher_bench.py [--n-loop 200] [--n-vec 1437] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal, fisher_diagonal_reference

KINDS = ("true_expected", "empirical")
MODELS = {
    "mlp (128,128)": ModelConfig(name="mlp", hidden=(128, 128)),
    "cnn (16,32)": ModelConfig(name="cnn", channels=(16, 32)),
}


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    if n > len(bunch.images):
        raise SystemExit(f"--n-vec/--n-loop {n} exceeds the {len(bunch.images)} digits samples")
    X = torch.from_numpy((bunch.images[:n].astype(np.float32) / 16.0)[:, None, :, :])
    y = torch.from_numpy(bunch.target[:n].astype(np.int64))
    return X, y


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (vmap tracing, allocator, first-call overheads)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-loop", type=int, default=200, help="samples for the Python loop")
    parser.add_argument("--n-vec", type=int, default=1437, help="samples for the vectorised path")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    parser.add_argument("--batch-size", type=int, default=256, help="vectorised batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if min(args.n_loop, args.n_vec, args.repeats, args.batch_size, args.threads) < 1:
        parser.error("all counts must be >= 1")

    torch.set_num_threads(args.threads)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, threads={torch.get_num_threads()}, cpus={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"data: sklearn digits /16, (N,1,8,8) float32; loop N={args.n_loop}, "
        f"vectorised N={args.n_vec} (batch {args.batch_size}); best of {args.repeats} "
        "after 1 warm-up"
    )
    X_all, y_all = digits(max(args.n_loop, args.n_vec))
    X_loop, y_loop = X_all[: args.n_loop], y_all[: args.n_loop]
    X_vec, y_vec = X_all[: args.n_vec], y_all[: args.n_vec]

    header = (
        f"{'kind':<14} {'model':<14} {'params':>8} {'loop samp/s':>12} "
        f"{'vec samp/s':>12} {'vec/loop':>9} {'max|diff|':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for kind in KINDS:
        for label, cfg in MODELS.items():
            model: nn.Module = build_model(cfg, (1, 8, 8), 10, seed=0).eval()
            n_params = sum(p.numel() for p in model.parameters())
            t_loop = best_time(
                lambda m=model, k=kind: fisher_diagonal_reference(m, X_loop, y_loop, kind=k),
                args.repeats,
            )
            t_vec = best_time(
                lambda m=model, k=kind: fisher_diagonal(
                    m, X_vec, y_vec, kind=k, batch_size=args.batch_size
                ),
                args.repeats,
            )
            loop_rate = args.n_loop / t_loop
            vec_rate = args.n_vec / t_vec
            # Correctness on the common samples (float32, so ~1e-9 rather than 1e-16).
            diff = max_abs_diff(
                fisher_diagonal(model, X_loop, y_loop, kind=kind, batch_size=args.batch_size),
                fisher_diagonal_reference(model, X_loop, y_loop, kind=kind),
            )
            print(
                f"{kind:<14} {label:<14} {n_params:>8,} {loop_rate:>12,.0f} "
                f"{vec_rate:>12,.0f} {vec_rate / loop_rate:>8.1f}x {diff:>10.2e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
