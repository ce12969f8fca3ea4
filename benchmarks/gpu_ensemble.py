"""The ensemble trainer on one GPU, at the sizes of issue 17, in one run (≤ 8 min on an H100).

    python -m benchmarks.gpu_ensemble            # on a machine with CUDA
    python -m benchmarks.gpu_ensemble --quick --device cpu   # a small dry run of the script

Fashion-MNIST-sized synthetic data (60,000 × 1×28×28 float32, 10 classes), α = 0.5 subsets
(30,000 samples per model), one epoch, Adam. Rows (issue goals: MLP ≥ 1,000, CNN ≥ 100
model-epochs/s):

- MLP 128-128, K=1024, batch 64; MLP 128-128, K=256, batch 256; CNN 16-32, K=256, batch 64;
  each in full float32 (TF32 off for matmuls and cuDNN) and with TF32 on; the CNN also with
  ``compile=True`` (last: compiling takes a while);
- one model at a time (``fit``) on the same GPU, MLP and CNN, batch 64: the baseline of the
  speed-up column;
- the matmul peak of this GPU measured here (8192² float32, TF32 off and on): the
  denominator of the "of peak" columns (each row against the peak of its own precision).

Model-epochs/s counts the whole ``train_ensemble`` call (building the K seeded models
included); "train" subtracts the build time (drawing the K seeded models and moving them
to the device), measured separately. Then one short
``torch.profiler`` pass over MLP K=1024 batch 64 prints the top CUDA kernels, for whoever
continues the tuning. A row that fails prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import traceback
from collections.abc import Callable

import torch

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.training.ensemble import _init_stacked, train_ensemble, train_step_flops
from pipeline_lib.training.fit import FitSettings, fit

SHAPE = (1, 28, 28)
N_CLASSES = 10
MLP = ModelConfig(name="mlp", hidden=(128, 128))
CNN = ModelConfig(name="cnn", channels=(16, 32))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul_peak(device: torch.device, size: int, repeats: int = 5) -> float:
    """Best float32 ``torch.matmul`` rate of size² matrices under the current TF32 setting."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)
    best = min(timed(lambda: torch.matmul(a, b), device) for _ in range(repeats))
    return 2 * size**3 / best


def subset_masks(k: int, n_total: int, n: int, seed: int) -> torch.Tensor:
    """(k, n_total) bool, n True per row: independent seeded α-subsets."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(k, n_total, generator=g)
    masks = torch.zeros(k, n_total, dtype=torch.bool)
    masks.scatter_(1, scores.argsort(dim=1)[:, :n], True)
    return masks


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script runs")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled CNN rows")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later rows skipped")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_ensemble: torch sees no CUDA device (use --device cpu --quick)")
    t_start = time.perf_counter()

    n_total = 4_000 if args.quick else 60_000
    n = n_total // 2
    scale = 16 if args.quick else 1  # --quick: K ÷ 16
    rows_spec = [  # (label, cfg, K, batch, tf32, compile)
        ("mlp", MLP, 1024 // scale, 64, False, False),
        ("mlp", MLP, 1024 // scale, 64, True, False),
        ("mlp", MLP, 256 // scale, 256, False, False),
        ("mlp", MLP, 256 // scale, 256, True, False),
        ("cnn", CNN, 256 // scale, 64, False, False),
        ("cnn", CNN, 256 // scale, 64, True, False),
    ]
    if not args.no_compile:
        rows_spec.append(("cnn", CNN, 256 // scale, 64, True, True))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print("$ " + shlex.join([sys.executable, "-m", "benchmarks.gpu_ensemble", *sys.argv[1:]]))
    print(
        f"torch {torch.__version__}, {name}, data {n_total}×{'×'.join(map(str, SHAPE))} "
        f"synthetic, α=0.5 → n={n} per model, 1 epoch, Adam lr 1e-3; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    g = torch.Generator().manual_seed(0)
    X = torch.rand(n_total, *SHAPE, generator=g)
    y = torch.randint(0, N_CLASSES, (n_total,), generator=g)

    peak_size = 1024 if args.quick else 8192
    peaks = {}
    for tf32 in (False, True):
        set_tf32(tf32)
        peaks[tf32] = matmul_peak(device, peak_size)
    print(
        f"matmul peak ({peak_size}², measured here): float32 {peaks[False] / 1e12:.2f} TFLOP/s, "
        f"TF32 {peaks[True] / 1e12:.2f} TFLOP/s"
    )

    # warm-up: CUDA context, cuBLAS/cuDNN handles, allocator
    set_tf32(False)
    wm = subset_masks(4, 512, 256, seed=9)
    for cfg in (MLP, CNN):
        settings = FitSettings(epochs=1, batch_size=64, lr=1e-3)
        train_ensemble(
            cfg, SHAPE, N_CLASSES, X[:512], y[:512], wm, list(range(4)), settings, device
        )

    # one model at a time: the baseline
    alone = {}
    for label, cfg in (("mlp", MLP), ("cnn", CNN)):
        m = subset_masks(1, n_total, n, seed=1)[0]
        settings = FitSettings(epochs=1, batch_size=64, lr=1e-3)

        def one(cfg: ModelConfig = cfg, m: torch.Tensor = m, s: FitSettings = settings) -> None:
            fit(build_model(cfg, SHAPE, N_CLASSES, 0), X[m], y[m], s, 0, device=device)

        alone[label] = 1.0 / timed(one, device)
        print(
            f"one model at a time ({label}, batch 64, float32): {alone[label]:.2f} model-epochs/s"
        )

    print(
        "\n| model | K | batch | precision | model-epochs/s | speed-up vs one at a time "
        "| train model-epochs/s | TFLOP/s (train) | of peak | build s | peak GPU mem GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    masks_cache: dict[int, torch.Tensor] = {}
    for label, cfg, k, bs, tf32, comp in rows_spec:
        if time.perf_counter() - t_start > args.budget:
            print(f"| {label} | {k} | {bs} | skipped: past the --budget of {args.budget:.0f}s |")
            continue
        precision = ("TF32" if tf32 else "float32") + (" + compile" if comp else "")
        try:
            set_tf32(tf32)
            if k not in masks_cache:
                masks_cache[k] = subset_masks(k, n_total, n, seed=1)
            masks = masks_cache[k]
            settings = FitSettings(epochs=1, batch_size=bs, lr=1e-3)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            template = build_model(cfg, SHAPE, N_CLASSES, 0)
            build = timed(  # what train_ensemble does first: draw the K models, move them
                lambda template=template, k=k: [
                    t.to(device) for t in _init_stacked(template, list(range(k))).values()
                ],
                device,
            )

            def run(cfg=cfg, k=k, masks=masks, settings=settings, comp=comp) -> None:
                train_ensemble(
                    cfg, SHAPE, N_CLASSES, X, y, masks, list(range(k)), settings, device, comp
                )

            if comp:
                run()  # the first call compiles; time the second
            seconds = timed(run, device)
            mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
            flops = train_step_flops(cfg, SHAPE, N_CLASSES, 1) * n * k
            train_s = max(seconds - build, 1e-9)
            rate = flops / train_s
            print(
                f"| {label} | {k} | {bs} | {precision} | {k / seconds:.1f} | "
                f"{k / seconds / alone[label]:.0f}× | {k / train_s:.1f} | {rate / 1e12:.2f} | "
                f"{rate / peaks[tf32]:.0%} | {build:.2f} | {mem:.1f} |"
            )
        except Exception as exc:  # one failing row must not lose the others
            print(f"| {label} | {k} | {bs} | {precision} | FAILED: {type(exc).__name__}: {exc} |")
            traceback.print_exc(file=sys.stderr)
        sys.stdout.flush()
    set_tf32(False)

    if not args.no_profile and time.perf_counter() - t_start < args.budget + 60:
        from torch.profiler import ProfilerActivity, profile

        k = 1024 // scale
        masks = subset_masks(k, 64 * 20 * 2, 64 * 20, seed=1)  # 20 steps of batch 64
        settings = FitSettings(epochs=1, batch_size=64, lr=1e-3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            train_ensemble(
                MLP, SHAPE, N_CLASSES, X[: masks.shape[1]], y[: masks.shape[1]], masks,
                list(range(k)), settings, device,
            )  # fmt: skip
            sync(device)
        key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile: MLP K={k}, batch 64, 20 steps (float32), top ops by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=15))
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
