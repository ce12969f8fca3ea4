"""The ensemble trainer on one GPU, at the sizes of issue 17, in one run (≤ 8 min on an H100).

    python -m benchmarks.gpu_ensemble            # on a machine with CUDA
    python -m benchmarks.gpu_ensemble --quick --device cpu   # a small dry run of the script

Fashion-MNIST-sized synthetic data (60,000 × 1×28×28 float32, 10 classes), α = 0.5 subsets
(30,000 samples per model), one epoch, Adam. Rows (issue goals: MLP ≥ 1,000, CNN ≥ 100
model-epochs/s):

- MLP 128-128, K=1024, batch 64; MLP 128-128, K=256, batch 256; CNN 16-32, K=256, batch 64;
  each in full float32 (TF32 off for matmuls and cuDNN) and with TF32 on; the CNN also with
  ``compile=True`` (last: compiling takes a while), and with ``conv_kernel="triton"`` (the
  Triton implicit-GEMM convolutions of pipeline_lib/training/ensemble_conv.py);
- one model at a time (``fit``) on the same GPU, MLP and CNN, batch 64: the baseline of the
  speed-up column;
- the matmul peak of this GPU measured here (8192² float32, TF32 off and on): the
  denominator of the "of peak" columns (each row against the peak of its own precision).

Model-epochs/s counts the whole ``train_ensemble`` call (building the K seeded models
included); "train" subtracts the build time (drawing the K seeded models and moving them
to the device), measured separately; "loop" also subtracts the return of the weights to the
host (a page-locked copy of the same size, measured separately), leaving the epoch itself.
Extra rows: ``--before FILE`` loads an earlier ``pipeline_lib/training/ensemble.py`` (e.g.
``git show REV:pipeline_lib/training/ensemble.py``) and runs the MLP goal row with it in the
same process, for a before/after ratio on the same card; the CNN with
``torch.backends.cudnn.benchmark`` on (cuDNN times its algorithms for each new shape and
keeps the fastest; the first call pays the search and is not timed).

Then the MLP K=1024 batch 64 step in steady state (after warm-up, no build or copies): CUDA
time per step of the forward/backward and of the optimizer, separately, float32 and TF32,
and one ``torch.profiler`` table of its top CUDA kernels, for whoever continues the tuning.
A row that fails prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from pipeline_lib.training import ensemble
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


def load_before(path: str):
    """An earlier ensemble.py as a module (its imports resolve against this checkout)."""
    spec = importlib.util.spec_from_file_location("ensemble_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_back_seconds(cfg: ModelConfig, k: int, device: torch.device) -> float:
    """Time of returning K models' parameters to the host the way the trainer does."""
    n_params = sum(p.numel() for p in build_model(cfg, SHAPE, N_CLASSES, 0).parameters())
    flat = torch.zeros(k * n_params, device=device)
    ensemble._host_copy(flat)  # warm the page-locked allocator
    return min(timed(lambda: ensemble._host_copy(flat), device) for _ in range(2))


def steady_state(device: torch.device, k: int, batch: int, n_total: int, profile: bool) -> None:
    """CUDA ms per step of the MLP fast path in steady state: forward+backward, optimizer."""
    template = build_model(MLP, SHAPE, N_CLASSES, 0)
    stacked = {n: t.to(device) for n, t in _init_stacked(template, list(range(k))).items()}
    flat = ensemble._FlatParams(stacked)
    del stacked
    opt = ensemble._FlatOptimizer(flat, FitSettings(epochs=1, batch_size=batch, lr=1e-3))
    step = ensemble._MLPStep(ensemble._mlp_plan(template), flat)
    g = torch.Generator().manual_seed(3)
    X2 = torch.rand(n_total, 28 * 28, generator=g).to(device)
    y = torch.randint(0, N_CLASSES, (n_total,), generator=g).to(device)
    rows = torch.randint(0, n_total, (40, k, batch), generator=g).to(device)

    def run(i: int, part: str) -> None:
        if part in ("fwd+bwd", "both"):
            step(X2, y, rows[i % 40])
        if part in ("optimizer", "both"):
            opt.step()

    for tf32 in (False, True):
        set_tf32(tf32)
        for i in range(10):
            run(i, "both")
        out = []
        for part in ("fwd+bwd", "optimizer", "both"):

            def fifty(part: str = part) -> None:
                for i in range(50):
                    run(i, part)

            ms = timed(fifty, device) / 50 * 1e3
            out.append(f"{part} {ms:.3f} ms")
        print(
            f"steady state, MLP K={k}, batch {batch}, {'TF32' if tf32 else 'float32'}: "
            + ", ".join(out)
            + f"  (an epoch of n={n_total // 2}: {-(-n_total // 2 // batch)} steps)"
        )
    set_tf32(False)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof_ctx

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof_ctx(activities=acts) as prof:
            for i in range(20):
                run(i, "both")
            sync(device)
        print(f"\nprofile: steady state, MLP K={k}, batch {batch}, 20 steps, float32")
        key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script runs")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled CNN rows")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later rows skipped")
    ap.add_argument("--before", help="an earlier ensemble.py: adds the MLP goal row run with it")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_ensemble: torch sees no CUDA device (use --device cpu --quick)")
    t_start = time.perf_counter()

    n_total = 4_000 if args.quick else 60_000
    n = n_total // 2
    scale = 16 if args.quick else 1  # --quick: K ÷ 16
    rows_spec = [  # (label, cfg, K, batch, tf32, compile, variant)
        ("mlp", MLP, 1024 // scale, 64, False, False, ""),
        ("mlp", MLP, 1024 // scale, 64, True, False, ""),
        ("mlp", MLP, 256 // scale, 256, False, False, ""),
        ("mlp", MLP, 256 // scale, 256, True, False, ""),
        ("cnn", CNN, 256 // scale, 64, False, False, ""),
        ("cnn", CNN, 256 // scale, 64, True, False, ""),
        ("cnn", CNN, 256 // scale, 64, True, False, "cudnn.benchmark"),
    ]
    if device.type == "cuda":  # Triton's interpreter on a CPU would take hours at these sizes
        rows_spec.append(("cnn", CNN, 256 // scale, 64, False, False, "triton"))
        rows_spec.append(("cnn", CNN, 256 // scale, 64, True, False, "triton"))
        # ensemble_conv.UNPOOL_IN_KERNELS: the backward reads the pooled gradient and argmax
        rows_spec.append(("cnn", CNN, 256 // scale, 64, True, False, "triton-unpool"))
    if args.before:
        rows_spec.insert(0, ("mlp", MLP, 1024 // scale, 64, False, False, "before"))
    if not args.no_compile:
        rows_spec.append(("cnn", CNN, 256 // scale, 64, True, True, ""))
        rows_spec.append(("cnn", CNN, 256 // scale, 64, True, True, "cudnn.benchmark"))
    before = load_before(args.before) if args.before else None

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
    # and one untimed call at the largest size, so that no row (the first, or --before's)
    # pays the device and page-locked allocators' first growth to it (~0.4 s on an H200)
    kw = 1024 // (16 if args.quick else 1)
    wm = subset_masks(kw, 64 * 4 * 2, 64 * 4, seed=9)
    train_ensemble(
        MLP, SHAPE, N_CLASSES, X[: wm.shape[1]], y[: wm.shape[1]], wm, list(range(kw)),
        FitSettings(epochs=1, batch_size=64, lr=1e-3), device,
    )  # fmt: skip

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
        "| train model-epochs/s | loop model-epochs/s | TFLOP/s (loop) | of peak | build s "
        "| copy-back s | peak GPU mem GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    copy_cache: dict[tuple[str, int], float] = {}
    masks_cache: dict[int, torch.Tensor] = {}
    for label, cfg, k, bs, tf32, comp, variant in rows_spec:
        if time.perf_counter() - t_start > args.budget:
            print(f"| {label} | {k} | {bs} | skipped: past the --budget of {args.budget:.0f}s |")
            continue
        precision = ("TF32" if tf32 else "float32") + (" + compile" if comp else "")
        precision += f" ({variant})" if variant else ""
        trainer = before.train_ensemble if variant == "before" else train_ensemble
        try:
            set_tf32(tf32)
            torch.backends.cudnn.benchmark = variant == "cudnn.benchmark"
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

            kernel = {"conv_kernel": "triton"} if variant.startswith("triton") else {}
            if variant.startswith("triton"):
                from pipeline_lib.training import ensemble_conv

                ensemble_conv.UNPOOL_IN_KERNELS = variant == "triton-unpool"

            def run(cfg=cfg, k=k, masks=masks, settings=settings, comp=comp, fn=trainer, kw=kernel):
                fn(cfg, SHAPE, N_CLASSES, X, y, masks, list(range(k)), settings, device, comp, **kw)

            if comp or variant == "cudnn.benchmark" or variant.startswith("triton"):
                run()  # the first call compiles (torch.compile, Triton) or searches cuDNN's
                # algorithms; time the second
            seconds = timed(run, device)
            mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
            if (label, k) not in copy_cache:
                copy_cache[label, k] = copy_back_seconds(cfg, k, device)
            copy_s = copy_cache[label, k]
            flops = train_step_flops(cfg, SHAPE, N_CLASSES, 1) * n * k
            train_s = max(seconds - build, 1e-9)
            loop_s = max(seconds - build - copy_s, 1e-9)
            rate = flops / loop_s
            print(
                f"| {label} | {k} | {bs} | {precision} | {k / seconds:.1f} | "
                f"{k / seconds / alone[label]:.0f}× | {k / train_s:.1f} | {k / loop_s:.1f} | "
                f"{rate / 1e12:.2f} | {rate / peaks[tf32]:.0%} | {build:.2f} | {copy_s:.3f} | "
                f"{mem:.1f} |"
            )
        except Exception as exc:  # one failing row must not lose the others
            print(f"| {label} | {k} | {bs} | {precision} | FAILED: {type(exc).__name__}: {exc} |")
            traceback.print_exc(file=sys.stderr)
        sys.stdout.flush()
    set_tf32(False)
    torch.backends.cudnn.benchmark = False

    if time.perf_counter() - t_start < args.budget + 60:
        try:
            steady_state(device, 1024 // scale, 64, n_total, profile=not args.no_profile)
        except Exception as exc:
            print(f"steady state: FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
