"""Four ways to run one training step of K registry CNNs at once, timed on one device (issue 17).

    python -m benchmarks.gpu_cnn_variants               # on a machine with CUDA (~1 min)
    python -m benchmarks.gpu_cnn_variants --device cpu --quick   # a dry run (Triton interpreted)

The ensemble trainer's generic path (``torch.func.vmap`` over ``functional_call``) turns each
convolution of K models into one grouped convolution with ``groups=K``. A profile on an H200
(``benchmarks/gpu_phases.py``) showed cuDNN running that grouped convolution as one small
kernel per group (256 launches per convolution, each with its own layout conversion), and
PyTorch's NCHW max-pool backward taking 14% of the step. The variants, all computing the same
forward/backward of SmallCNN 16-32 on (K, B, 1, 28, 28) with autograd:

- ``vmap``: what the trainer does today;
- ``grouped``: the same grouped convolutions written out (NCHW), to separate vmap's own cost;
- ``grouped-cl``: the same in channels-last memory format (cuDNN's NHWC kernels);
- ``unfold-bmm``: each convolution as ``unfold`` (im2col) and one batched matrix product over
  the K models, activations kept channels-last;
- ``triton``: the trainer's ``conv_kernel="triton"``, one Triton implicit-GEMM launch per
  convolution for all K models, bias and ReLU in the kernel, the ReLU's backward rule
  applied to the pooled gradient (pipeline_lib/training/ensemble_conv.py). After the
  table, its tile settings are swept and its kernels profiled;
- ``triton-unfused-pool``: the same convolutions with torch's max-pooling and a full-size
  ReLU backward, to show what the pooled rule saves;
- ``triton-unpool``: ``triton`` with ``ensemble_conv.UNPOOL_IN_KERNELS``: the backward's
  kernels read the pooled gradient and max-pooling's argmax instead of the full-size
  gradient that torch's max-pooling backward writes.

First each variant's loss and gradients are compared with ``vmap``'s in float32 (TF32 off);
then milliseconds per step (forward + backward, steady state) are printed, TF32 on, with
``cudnn.benchmark`` off and on. The fastest correct variant is the candidate for the trainer's
CNN path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.gpu_ensemble import CNN, N_CLASSES, SHAPE, set_tf32, sync
from pipeline_lib.models.image import build_model
from pipeline_lib.training import ensemble

Params = dict[str, torch.Tensor]


def _head(h: torch.Tensor, p: Params, k: int, b: int) -> torch.Tensor:
    """(K·B or B·K layout handled by caller) pooled (K, B, 128) → logits (K, B, C)."""
    return torch.baddbmm(p["net.8.bias"].unsqueeze(1), h, p["net.8.weight"].transpose(1, 2))


def grouped(p: Params, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x (K, B, 1, H, W) → logits (K, B, C) with groups=K convolutions."""
    k, b = x.shape[:2]
    h = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    h = h.contiguous(memory_format=fmt)
    for conv in ("net.0", "net.3"):
        w = p[f"{conv}.weight"]
        w = w.reshape(-1, *w.shape[2:]).contiguous(memory_format=fmt)
        h = F.conv2d(h, w, p[f"{conv}.bias"].reshape(-1), padding=1, groups=k)
        h = F.max_pool2d(F.relu(h), 2, ceil_mode=True)
    h = F.adaptive_avg_pool2d(h, 2)  # (B, K·32, 2, 2)
    h = h.reshape(b, k, -1).transpose(0, 1)  # (K, B, 128), flatten order c·4 + i·2 + j
    return _head(h, p, k, b)


def unfold_bmm(p: Params, x: torch.Tensor) -> torch.Tensor:
    """x (K, B, 1, H, W) → logits (K, B, C): each convolution as im2col + one bmm."""
    k, b = x.shape[:2]
    h = x.reshape(k * b, *x.shape[2:])  # (K·B, C, H, W), model-major
    for conv in ("net.0", "net.3"):
        w, bias = p[f"{conv}.weight"], p[f"{conv}.bias"]  # (K, O, C, 3, 3), (K, O)
        hh, ww = h.shape[-2:]
        cols = F.unfold(h, 3, padding=1)  # (K·B, C·9, H·W)
        cols = cols.view(k, b, -1, hh * ww).transpose(2, 3).reshape(k, b * hh * ww, -1)
        out = torch.baddbmm(bias.unsqueeze(1), cols, w.reshape(k, w.shape[1], -1).transpose(1, 2))
        # (K, B·H·W, O) is channels-last: view it as (K·B, O, H, W) without a copy
        h = out.view(k * b, hh, ww, -1).permute(0, 3, 1, 2)
        h = F.max_pool2d(F.relu(h), 2, ceil_mode=True)
    h = F.adaptive_avg_pool2d(h, 2)  # (K·B, 32, 2, 2)
    h = h.reshape(k, b, -1)
    return _head(h, p, k, b)


# tile settings of pipeline_lib/training/ensemble_conv.py swept on the card:
# (BLOCK_P, WGRAD_BLOCK_P, WGRAD_BLOCK_R, WGRAD_POSITIONS_PER_SPLIT, NUM_WARPS)
SWEEP = [
    (64, 64, 16, 4096, 4),  # the defaults
    (128, 64, 16, 4096, 4),
    (32, 64, 16, 4096, 4),
    (64, 64, 32, 4096, 4),
    (64, 64, 64, 4096, 4),
    (64, 128, 32, 4096, 8),
    (64, 64, 16, 1024, 4),
    (64, 64, 16, 16384, 4),
    (128, 128, 32, 2048, 8),
    (128, 64, 64, 2048, 8),
]


def triton_sweep(step, device: torch.device, quick: bool) -> None:
    """ms per step of the triton variant under each tile setting (TF32 on), then a profile
    of its kernels at the defaults: what whoever tunes the kernels needs from one run."""
    from pipeline_lib.training import ensemble_conv as ec

    names = ("BLOCK_P", "WGRAD_BLOCK_P", "WGRAD_BLOCK_R", "WGRAD_POSITIONS_PER_SPLIT", "NUM_WARPS")
    defaults = tuple(getattr(ec, n) for n in names)
    print("\ntriton tiles, ms per step (forward + backward, TF32 on; first row: the defaults)")
    print("| " + " | ".join(names) + " | ms per step |")
    print("|---|---|---|---|---|---|")
    for setting in SWEEP[:2] if quick else SWEEP:
        for n, v in zip(names, setting, strict=True):
            setattr(ec, n, v)
        try:
            for i in range(2 if quick else 5):  # includes compiling this setting
                step(i)
            sync(device)
            reps = 2 if quick else 20
            t0 = time.perf_counter()
            for i in range(reps):
                step(i)
            sync(device)
            cell = f"{(time.perf_counter() - t0) / reps * 1e3:.2f}"
        except Exception as exc:
            cell = f"FAILED {type(exc).__name__}: {exc}"[:80]
        print("| " + " | ".join(map(str, setting)) + f" | {cell} |")
        sys.stdout.flush()
    for n, v in zip(names, defaults, strict=True):
        setattr(ec, n, v)
    if device.type == "cuda" and not quick:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                step(i)
            sync(device)
        print("\nprofile: triton variant, 10 steps, defaults, TF32 on")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def triton_unfused(p: Params, x: torch.Tensor) -> torch.Tensor:
    """x (K, B, 1, H, W) → logits (K, B, C): the Triton convolutions (bias and ReLU in the
    kernel) with torch's max-pooling and ReLU backward as separate full-size passes: the
    trainer's path before the pooled ReLU rule (ensemble_conv._ConvReluPool)."""
    from pipeline_lib.training import ensemble_conv as ec

    def layer(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = ec.conv3x3(h, w, bias, relu=True)
        return ec._pool(h, lambda t: F.max_pool2d(t, 2, ceil_mode=True))

    return ec.cnn_forward(p, x, 2, layer).transpose(1, 2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_cnn_variants: no CUDA device (use --device cpu --quick)")
    k, b = (2, 2) if args.quick else (256, 64)
    template = build_model(CNN, SHAPE, N_CLASSES, 0)
    stacked = ensemble._init_stacked(template, list(range(k)))
    params = {n: t.to(device).requires_grad_() for n, t in stacked.items()}
    base = template.to("meta")
    vmapped = ensemble._vmap_forward(base)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(k, b, *SHAPE, generator=g).to(device) for _ in range(8)]
    ys = [torch.randint(0, N_CLASSES, (k, b), generator=g).to(device) for _ in range(8)]

    if device.type == "cpu":  # the Triton kernels run in Triton's interpreter (slow)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tritoned = ensemble._triton_forward(base)
    variants = {
        "vmap": lambda p, x: vmapped(p, x).transpose(1, 2),  # (K, B, C)
        "grouped": lambda p, x: grouped(p, x, False),
        "grouped-cl": lambda p, x: grouped(p, x, True),
        "unfold-bmm": unfold_bmm,
        "triton": lambda p, x: tritoned(p, x).transpose(1, 2),
        "triton-unfused-pool": triton_unfused,
        # the same forward as "triton"; its backward reads the pooled gradient and the
        # argmax in the kernels (ensemble_conv.UNPOOL_IN_KERNELS, set below for this variant)
        "triton-unpool": lambda p, x: tritoned(p, x).transpose(1, 2),
    }
    from pipeline_lib.training import ensemble_conv as ec

    def step(fn, i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for t in params.values():
            t.grad = None
        logits = fn(params, xs[i % 8])
        loss = F.cross_entropy(
            logits.reshape(-1, N_CLASSES), ys[i % 8].reshape(-1), reduction="sum"
        )
        (loss / b).backward()
        return loss.detach(), [t.grad for t in params.values()]

    set_tf32(False)
    ref_loss, ref_grads = step(variants["vmap"], 0)
    print(
        f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"K={k}, batch {b}, SmallCNN 16-32 on 1×28×28"
    )
    print("float32 (TF32 off), vs vmap: max |Δ| / max |ref| of loss and of every gradient")
    ok = {}
    for name, fn in variants.items():
        ec.UNPOOL_IN_KERNELS = name == "triton-unpool"
        loss, grads = step(fn, 0)
        rel = max(
            [float((loss - ref_loss).abs() / ref_loss.abs())]
            + [
                float((a - r).abs().max() / r.abs().max())
                for a, r in zip(grads, ref_grads, strict=True)
            ]
        )
        ok[name] = rel < 1e-4
        print(f"  {name}: {rel:.2e} {'ok' if ok[name] else 'DIFFERS'}")
    set_tf32(True)
    print("\nms per step (forward + backward, steady state), TF32 on")
    print("| variant | cudnn.benchmark off | on |")
    print("|---|---|---|")
    for name, fn in variants.items():
        ec.UNPOOL_IN_KERNELS = name == "triton-unpool"
        cells = []
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            warm, reps = (1, 2) if args.quick else (5, 20)
            try:
                for i in range(warm):
                    step(fn, i)
                sync(device)
                t0 = time.perf_counter()
                for i in range(reps):
                    step(fn, i)
                sync(device)
                cells.append(f"{(time.perf_counter() - t0) / reps * 1e3:.2f}")
            except Exception as exc:  # one failing variant must not lose the others
                cells.append(f"FAILED {type(exc).__name__}: {exc}"[:80])
        print(f"| {name}{'' if ok[name] else ' (differs)'} | {cells[0]} | {cells[1]} |")
        sys.stdout.flush()
    torch.backends.cudnn.benchmark = False
    ec.UNPOOL_IN_KERNELS = False
    if ok["triton"]:
        triton_sweep(lambda i: step(variants["triton"], i), device, quick=args.quick)
    set_tf32(False)


if __name__ == "__main__":
    main()
