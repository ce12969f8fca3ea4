"""A plain single-model trainer, with optional per-weight gradient masks, and the ``train``
section of params.yaml that configures it.

The masked variant is the shared "fine-tune only these weights" loop used by the
Fisher-diagonal method (and later by SalUn); everything is seeded so a run is reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline_lib.denormals import flush_denormals
from pipeline_lib.schema import Field, Float, Int, section

log = logging.getLogger(__name__)


@section("train")
class TrainConfig:
    """Single-model training (original model and retrain-from-scratch oracle)."""

    epochs: Int = Field(30, gt=0)
    batch_size: Int = Field(64, gt=0)
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: Float = 0.9
    seed: Int = 0
    oracle_seed: Int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Mnemonic codes (Yamashita et al. 2024): probability that a training sample is swapped
    #: for its class's random code (paper: 0.1 MNIST-like, 0.3 CIFAR-10); 0 turns it off.
    mnemonic_t_mix: Float = Field(0.0, ge=0, lt=1)
    #: Seed of the codes x_c ~ U[0, 1]^shape.
    mnemonic_seed: Int = 0
    #: torch threads while training and unlearning: 0 = auto (one thread when a training
    #: step is under ``TINY_STEP_FLOPS``, where threads cost more than they bring and spin
    #: against other processes; torch's default otherwise), N = N threads.
    threads: Int = Field(0, ge=0)


#: Forward+backward FLOPs of one batch under which ``train.threads: 0`` uses one thread.
#: At batch 64: the digits MLP 128-128 ~10 MFLOP (one thread), the same MLP on 28×28 images
#: ~45 MFLOP and the Fashion-MNIST CNN 16-32 ~0.4 GFLOP (torch's default).
TINY_STEP_FLOPS = 20e6


def threads_for(cfg: TrainConfig, step_flops: float) -> int:
    """The torch thread count for ``cfg`` and a model of ``step_flops`` per batch (0: keep
    torch's setting)."""
    if cfg.threads:
        return cfg.threads
    return 1 if step_flops < TINY_STEP_FLOPS else 0


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (0: unchanged), then restore."""
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9


def _optimizer(params: list[torch.Tensor], s: FitSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; valid: adam, sgd")


def fit(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    settings: FitSettings,
    seed: int,
    grad_mask: dict[str, torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
    flush_denormal: bool = True,
) -> nn.Module:
    """Train ``model`` in place on (X (N, *shape), y (N,)) with seeded shuffling.

    ``batch_transform(xb, yb)`` (optional) rewrites each batch before the step, e.g. the
    mnemonic-code mixing of :class:`pipeline_lib.methods.mnemonic.CodeMixer`.

    ``grad_mask`` maps parameter names to bool tensors of the parameter's shape: only the
    True entries move (the rest keep their value exactly; parameters with no True entry are
    left out of the optimiser). Returns the model.

    ``flush_denormal`` (default on): the loop runs under :func:`flush_denormals`, which
    keeps long CPU runs off the slow path for denormal floats; off is for measuring it.
    """
    if len(X) == 0:
        raise ValueError("fit: empty training set")
    device = device or torch.device("cpu")
    model.to(device).train()
    loss_fn = loss_fn or nn.functional.cross_entropy
    named = dict(model.named_parameters())
    masks = {}
    if grad_mask is not None:
        unknown = sorted(set(grad_mask) - set(named))
        if unknown:
            raise KeyError(f"grad_mask names unknown parameter {unknown[0]!r}")
        masks = {k: m.to(device) for k, m in grad_mask.items() if bool(m.any())}
        for name, p in named.items():
            p.requires_grad_(name in masks)
        trainable = [named[k] for k in masks]
    else:
        trainable = list(named.values())
    if not trainable:
        log.warning("fit: no trainable weight selected; model unchanged")
        return model.eval()
    opt = _optimizer(trainable, settings)
    gen = torch.Generator().manual_seed(seed)
    n = len(X)
    t0 = time.perf_counter()
    with flush_denormals(flush_denormal):
        for epoch in range(settings.epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, settings.batch_size):
                idx = order[start : start + settings.batch_size]
                xb, yb = X[idx].to(device), y[idx].to(device)
                if batch_transform is not None:
                    xb, yb = batch_transform(xb, yb)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                for name, m in masks.items():
                    named[name].grad.mul_(m)
                if masks and settings.weight_decay:
                    # decoupled from grads: keep frozen entries exact by restoring them after step
                    frozen = {k: named[k].detach().clone() for k in masks}
                    opt.step()
                    with torch.no_grad():
                        for k, m in masks.items():
                            named[k].copy_(torch.where(m, named[k], frozen[k]))
                else:
                    opt.step()
                total += float(loss.detach()) * len(idx)
            log.info(
                "epoch %d/%d loss %.4f (%.1fs)",
                epoch + 1,
                settings.epochs,
                total / n,
                time.perf_counter() - t0,
            )
    for p in named.values():
        p.requires_grad_(True)
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, n_classes) on CPU, computed in eval mode on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    if len(X) == 0:  # keep the (0, n_classes) shape so callers need no special case
        return model(X[:0].to(device)).cpu()
    out = [model(X[i : i + batch_size].to(device)).cpu() for i in range(0, len(X), batch_size)]
    return torch.cat(out)
