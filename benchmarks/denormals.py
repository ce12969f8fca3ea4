"""Long CPU training runs with and without flushing denormal floats, side by side.

Adam's first moment of a weight whose gradient has become exactly zero (a dead ReLU unit, an
input pixel that is almost always 0) decays by β₁ = 0.9 per step and is a float32 denormal
(< 1.2e-38) after ~800 steps; x86 CPUs compute on denormals through a slow path. The
trainers (``fit``, ``train_ensemble``) now run their loops under
``pipeline_lib.denormals.flush_denormals``; ``flush_denormal=False`` is the old behaviour.

For each case the script trains the same models both ways, in interleaved rounds (the order
alternates; best of ``--repeats`` kept), and prints per case: optimizer steps per model,
seconds without and with flushing, the speed-up, the share of Adam's first-moment entries
that are denormal at the end of the unflushed run, and the largest weight difference between
the two runs (0 means the same weights bit for bit).

    python -m benchmarks.denormals [--n 20000] [--k 8] [--epochs 20] [--digits-epochs 100]
        [--repeats 2] [--threads 1]

Cases: ``train_ensemble`` of K MLPs 128-128 on α = 0.5 subsets of the first ``--n``
Fashion-MNIST training images (real data, Debian's dataset-fashion-mnist), ``fit`` of one such
model, and ``train_ensemble`` of 2K MLPs on digits for ``--digits-epochs`` epochs (the
default attribution runs 30 epochs: ~450 steps, before the moments reach denormals).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from benchmarks._common import load_split
from benchmarks.ensemble_bench import subset_masks
from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.training import ensemble
from pipeline_lib.training import fit as fit_module
from pipeline_lib.training.ensemble import train_ensemble
from pipeline_lib.training.fit import FitSettings, fit

MLP = ModelConfig(name="mlp", hidden=(128, 128))

#: Per optimizer the trainers made during the current call (the benchmark's own spies): a
#: function giving its Adam first moments, read at the end of the call.
_MOMENTS: list[Callable[[], list[torch.Tensor]]] = []
_original_optimizer = fit_module._optimizer


class _SpiedFlatOptimizer(ensemble._FlatOptimizer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _MOMENTS.append(lambda: [self.exp_avg])


def _spied_optimizer(params, settings):
    opt = _original_optimizer(params, settings)
    _MOMENTS.append(lambda: [s["exp_avg"] for s in opt.state.values()])
    return opt


def _denormal_share() -> float:
    """Share of Adam's first-moment entries that are float32/64 denormals (nonzero, below
    the smallest normal number), over every optimizer the last call made."""
    tensors = [t for moments in _MOMENTS for t in moments()]
    total = sum(t.numel() for t in tensors)
    tiny = sum(
        int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum().item()) for t in tensors
    )
    return tiny / max(total, 1)


def _case_ensemble(X, y, k: int, epochs: int) -> Callable[[bool], dict[str, torch.Tensor]]:
    masks = subset_masks(k, len(X), len(X) // 2, seed=0)
    settings = FitSettings(epochs=epochs, batch_size=64, lr=1e-3)
    shape = tuple(X.shape[1:])

    def run(flush: bool) -> dict[str, torch.Tensor]:
        return train_ensemble(
            MLP, shape, 10, X, y, masks, list(range(k)), settings, flush_denormal=flush
        )

    return run


def _case_fit(X, y, epochs: int) -> Callable[[bool], dict[str, torch.Tensor]]:
    mask = subset_masks(1, len(X), len(X) // 2, seed=0)[0]
    settings = FitSettings(epochs=epochs, batch_size=64, lr=1e-3)
    shape = tuple(X.shape[1:])

    def run(flush: bool) -> dict[str, torch.Tensor]:
        model = build_model(MLP, shape, 10, 0)
        fit(model, X[mask], y[mask], settings, 0, flush_denormal=flush)
        return {n: p.detach().clone() for n, p in model.state_dict().items()}

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="Fashion-MNIST training images used")
    ap.add_argument("--k", type=int, default=8, help="models in the Fashion-MNIST ensemble")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--digits-epochs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    for name in ("n", "k", "epochs", "digits_epochs", "repeats", "threads"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    torch.set_num_threads(args.threads)
    ensemble._FlatOptimizer = _SpiedFlatOptimizer
    fit_module._optimizer = _spied_optimizer
    print(f"$ {' '.join([sys.executable, '-m', 'benchmarks.denormals', *sys.argv[1:]])}")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s); "
        f"load average at start: {os.getloadavg()[0]:.2f}"
    )
    Xf, yf, *_ = load_split("fashion-mnist")
    Xf, yf = torch.from_numpy(Xf[: args.n]), torch.from_numpy(yf[: args.n])
    Xd, yd, *_ = load_split("digits")
    Xd, yd = torch.from_numpy(Xd), torch.from_numpy(yd)
    per_epoch_f = -(-(args.n // 2) // 64)
    per_epoch_d = -(-(len(Xd) // 2) // 64)
    cases = [
        (
            f"train_ensemble, fashion-mnist n={args.n}, K={args.k}",
            args.epochs * per_epoch_f,
            _case_ensemble(Xf, yf, args.k, args.epochs),
        ),
        (
            f"fit, fashion-mnist n={args.n}, one model",
            args.epochs * per_epoch_f,
            _case_fit(Xf, yf, args.epochs),
        ),
        (
            f"train_ensemble, digits, K={2 * args.k}",
            args.digits_epochs * per_epoch_d,
            _case_ensemble(Xd, yd, 2 * args.k, args.digits_epochs),
        ),
    ]
    # the first torch.optim.Adam of a process imports torch._dynamo (~1.5 s): not fit's cost
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    best: dict[tuple[int, bool], float] = {}
    share: dict[int, float] = {}
    weights: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}
    t_start = time.perf_counter()
    for r in range(args.repeats):
        for i, (_, _, run) in enumerate(cases):
            for flush in (False, True) if (r + i) % 2 == 0 else (True, False):
                _MOMENTS.clear()
                t0 = time.perf_counter()
                out = run(flush)
                dt = time.perf_counter() - t0
                best[i, flush] = min(best.get((i, flush), float("inf")), dt)
                weights[i, flush] = out
                if not flush:
                    share[i] = _denormal_share()
        print(
            f"  round {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f}s, "
            f"load average {os.getloadavg()[0]:.2f})",
            flush=True,
        )
    print()
    head = f"{'case':<44} {'steps':>6} {'off s':>7} {'on s':>7} {'speed-up':>9}"
    print(head + f" {'denormal m (off)':>17} {'max |Δw|':>9}")
    for i, (label, steps, _) in enumerate(cases):
        off, on = best[i, False], best[i, True]
        diff = max(
            (weights[i, False][n] - weights[i, True][n]).abs().max().item()
            for n in weights[i, False]
        )
        print(
            f"{label:<44} {steps:>6} {off:>7.2f} {on:>7.2f} {off / on:>8.2f}× "
            f"{share[i]:>16.1%} {diff:>9.1e}"
        )


if __name__ == "__main__":
    main()
