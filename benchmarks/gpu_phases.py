"""Where one ``train_ensemble`` call's time goes on a GPU (issue 17), phase by phase.

    python -m benchmarks.gpu_phases                      # on a machine with CUDA (~1 min)
    python -m benchmarks.gpu_phases --device cpu --quick # a small dry run of the script

:mod:`benchmarks.gpu_ensemble` times whole calls of one epoch; this script splits the MLP goal
row (K = 1,024, batch 64, α = 0.5 of 60,000 × 1×28×28, TF32) into its phases, each timed
alone: drawing the K seeded models on the CPU (pageable and page-locked), moving them to the
card, drawing the first epoch's K permutations (one thread vs the pool the trainer uses), and
whole calls of 1, 5 and 30 epochs (30: ``train.epochs``, what an attribution chunk trains), TF32
and float32; the 1- and 30-epoch calls give the per-epoch cost without the fixed ones.
Then a ``torch.profiler`` table of the CNN (K = 256, batch 64, TF32) over 20 steps, for the
CNN goal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from benchmarks.gpu_ensemble import CNN, MLP, N_CLASSES, SHAPE, set_tf32, subset_masks, timed
from pipeline_lib.models.image import build_model
from pipeline_lib.training import ensemble
from pipeline_lib.training.fit import FitSettings


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: check the script runs")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_phases: torch sees no CUDA device (use --device cpu --quick)")
    t_start = time.perf_counter()
    k = 64 if args.quick else 1024
    n_total = 4_000 if args.quick else 60_000
    n = n_total // 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {name}, torch threads {torch.get_num_threads()}, "
        f"cpu_count {os.cpu_count()}, MLP K={k}, n={n}, batch 64, TF32"
    )
    set_tf32(True)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n_total, *SHAPE, generator=g)
    y = torch.randint(0, N_CLASSES, (n_total,), generator=g)
    masks = subset_masks(k, n_total, n, seed=1)
    seeds = list(range(k))
    template = build_model(MLP, SHAPE, N_CLASSES, 0)
    pin = device.type == "cuda"

    # warm-up: context, handles, allocators
    ensemble.train_ensemble(
        MLP, SHAPE, N_CLASSES, X[:512], y[:512], subset_masks(4, 512, 256, 9), list(range(4)),
        FitSettings(epochs=1, batch_size=64, lr=1e-3), device,
    )  # fmt: skip

    def init(pinned: bool) -> dict[str, torch.Tensor]:
        return ensemble._init_stacked(template, seeds, pin=pinned)

    for pinned in (False, True) if pin else (False,):
        times = [timed(lambda p=pinned: init(p), device) for _ in range(2)]
        print(
            f"draw K models on the CPU, page-locked={pinned}: "
            + ", ".join(f"{t:.3f}s" for t in times)
        )
    pageable, locked = init(False), init(pin)
    to_dev = timed(lambda: [t.to(device) for t in pageable.values()], device)
    to_dev_nb = timed(lambda: [t.to(device, non_blocking=True) for t in locked.values()], device)
    print(f"models to the device: pageable {to_dev:.3f}s, page-locked async {to_dev_nb:.3f}s")
    x_dev = timed(lambda: X.to(device), device)
    print(f"X ({X.numel() * 4 / 1e6:.0f} MB) to the device: {x_dev:.3f}s")

    for workers in (1, None):

        def first(w: int | None = workers) -> None:
            on = torch.device("meta") if device.type == "cpu" else device  # the pool path
            rows = ensemble._EpochRows(masks, seeds, n, 1, on, workers=w)
            next(iter(rows.host_epochs()))
            rows.close()

        label = "1 thread" if workers == 1 else "the trainer's pool"
        print(f"first epoch's permutations ({label}): {timed(first, device):.3f}s")

    for tf32 in (True, False):
        set_tf32(tf32)
        calls = {}
        for epochs in (1, 5, 30):  # 30: train.epochs, what an attribution chunk trains
            settings = FitSettings(epochs=epochs, batch_size=64, lr=1e-3)

            def run(s: FitSettings = settings) -> None:
                ensemble.train_ensemble(MLP, SHAPE, N_CLASSES, X, y, masks, seeds, s, device)

            calls[epochs] = timed(run, device)
            print(
                f"train_ensemble, {'TF32' if tf32 else 'float32'}, {epochs} epoch(s): "
                f"{calls[epochs]:.3f}s = {k * epochs / calls[epochs]:.1f} model-epochs/s"
            )
        per_epoch = (calls[30] - calls[1]) / 29
        print(
            f"per epoch without the fixed costs: {per_epoch:.3f}s = {k / per_epoch:.1f} "
            f"model-epochs/s; fixed costs per call {calls[1] - per_epoch:.3f}s"
        )
    set_tf32(True)

    from torch.profiler import ProfilerActivity, profile

    kc = 16 if args.quick else 256
    cm = subset_masks(kc, 64 * 20 * 2, 64 * 20, seed=1)
    cset = FitSettings(epochs=1, batch_size=64, lr=1e-3)

    def cnn() -> None:
        ensemble.train_ensemble(
            CNN, SHAPE, N_CLASSES, X[: cm.shape[1]], y[: cm.shape[1]], cm, list(range(kc)),
            cset, device,
        )  # fmt: skip

    cnn()
    print(f"\nCNN K={kc}, 20 steps of batch 64, TF32, one call: {timed(cnn, device):.3f}s")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pin else [])
    with profile(activities=acts) as prof:
        cnn()
        if pin:
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if pin else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    set_tf32(False)
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
