"""Unlearning-method registry. Every method has one signature::

    fn(model, inputs: UnlearnInputs, params, seed) -> (model, info)

``model`` is a copy of the original (the method may change it in place), ``params`` the
method's typed section of ``params.yaml`` (``unlearn.<name>``), ``info`` a dict of scalars
worth tracking (how many weights were reset, ...). Shared pieces (the masked fine-tune loop
in :mod:`pipeline_lib.train`, the Fisher diagonal) are composed, not re-written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline_lib.config import (
    ConfigError,
    FinetuneParams,
    FisherDiagonalParams,
    RetrainParams,
    TrainConfig,
)
from pipeline_lib.train import FitSettings, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnlearnInputs:
    """Everything a method may read. Tensors: X (N, *shape) float32, y (N,) int64."""

    forget_X: torch.Tensor
    forget_y: torch.Tensor
    retain_X: torch.Tensor
    retain_y: torch.Tensor
    #: Builds a freshly initialised model of the same architecture from a seed.
    model_factory: Callable[[int], nn.Module]
    train: TrainConfig
    #: Fisher diagonals I_F and I_R ({param name: tensor}) when the method needs them.
    fisher_forget: dict[str, torch.Tensor] | None = None
    fisher_retain: dict[str, torch.Tensor] | None = None
    device: torch.device = torch.device("cpu")


Info = dict[str, float | int | str]
MethodFn = Callable[[nn.Module, UnlearnInputs, Any, int], tuple[nn.Module, Info]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    params_type: type
    needs_fisher: bool
    summary: str


def select_by_ratio(
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    eps: float,
    threshold: float | None,
    top_fraction: float,
) -> tuple[dict[str, torch.Tensor], float]:
    """Masks of weights whose r_i = I_F/(I_R+ε) exceeds γ (or the top fraction of r).

    Returns ({name: bool mask}, the γ actually used).
    """
    names = sorted(fisher_forget)
    if set(names) != set(fisher_retain):
        raise ValueError("forget and retain Fisher statistics cover different parameters")
    # 0/0 (a weight no sample moves, with eps=0) is no evidence of forget-sensitivity
    ratio = {
        k: torch.nan_to_num(fisher_forget[k] / (fisher_retain[k] + eps), nan=0.0) for k in names
    }
    if threshold is not None:
        return {k: ratio[k] > threshold for k in names}, float(threshold)
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(
            f"unlearn.fisher_diagonal.top_fraction must be in (0, 1], got {top_fraction}"
        )
    flat = torch.cat([ratio[k].flatten() for k in names])
    k = max(1, int(round(top_fraction * flat.numel())))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    top = torch.topk(flat, k)
    chosen[top.indices] = True  # exact count even when ratios tie
    masks, offset = {}, 0
    for name in names:
        n = ratio[name].numel()
        masks[name] = chosen[offset : offset + n].view_as(ratio[name])
        offset += n
    return masks, float(top.values.min())


def fisher_diagonal_forgetting(
    model: nn.Module, inputs: UnlearnInputs, params: FisherDiagonalParams, seed: int
) -> tuple[nn.Module, Info]:
    """DeepClean Fisher-diagonal forgetting (arXiv 2311.10448; algorithms.md §1).

    1. r_i = I_F(θ_i) / (I_R(θ_i) + ε) from the per-sample Fisher diagonals of F and R.
    2. Weights with r_i > γ (or the ``top_fraction`` largest r_i) are the forget-sensitive
       ones: reset them — to zero (default; the paper leaves it open), or to a fresh
       initialisation drawn with ``seed``. On digits zero forgets more at equal test
       accuracy (BENCHMARKS.md).
    3. Fine-tune only those weights on R for ``epochs`` epochs, all others frozen.
    """
    if inputs.fisher_forget is None or inputs.fisher_retain is None:
        raise ValueError("fisher_diagonal needs the forget and retain Fisher diagonals")
    masks, gamma = select_by_ratio(
        inputs.fisher_forget,
        inputs.fisher_retain,
        params.eps,
        params.threshold,
        params.top_fraction,
    )
    named = dict(model.named_parameters())
    fresh = dict(inputs.model_factory(seed).named_parameters()) if params.reset == "reinit" else {}
    with torch.no_grad():
        for name, m in masks.items():
            replacement = (
                fresh[name].to(named[name].device) if fresh else torch.zeros_like(named[name])
            )
            named[name].copy_(torch.where(m.to(named[name].device), replacement, named[name]))
    n_reset = int(sum(int(m.sum()) for m in masks.values()))
    n_total = int(sum(m.numel() for m in masks.values()))
    log.info("fisher_diagonal: reset %d of %d weights (γ=%.4g)", n_reset, n_total, gamma)
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(
        model,
        inputs.retain_X,
        inputs.retain_y,
        settings,
        seed,
        grad_mask=masks,
        device=inputs.device,
    )
    return model, {"n_reset": n_reset, "fraction_reset": n_reset / n_total, "gamma": gamma}


def finetune(
    model: nn.Module, inputs: UnlearnInputs, params: FinetuneParams, seed: int
) -> tuple[nn.Module, Info]:
    """Fine-tune baseline (FT in SalUn's tables): all weights, a few epochs on R only."""
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(model, inputs.retain_X, inputs.retain_y, settings, seed, device=inputs.device)
    return model, {}


def retrain(
    model: nn.Module, inputs: UnlearnInputs, params: RetrainParams, seed: int
) -> tuple[nn.Module, Info]:
    """Retrain baseline: a fresh model trained on R from scratch with the ``train`` section;
    the original weights are ignored. This is the exact (and most expensive) answer."""
    t = inputs.train
    fresh = inputs.model_factory(params.seed).to(inputs.device)
    settings = FitSettings(t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum)
    fit(fresh, inputs.retain_X, inputs.retain_y, settings, params.seed, device=inputs.device)
    return fresh, {}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "fisher_diagonal",
            fisher_diagonal_forgetting,
            FisherDiagonalParams,
            True,
            "reset weights with high forget/retain Fisher ratio, fine-tune them on R",
        ),
        Method("finetune", finetune, FinetuneParams, False, "fine-tune all weights on R"),
        Method("retrain", retrain, RetrainParams, False, "train from scratch on R (oracle)"),
    )
}


def get_method(name: str) -> Method:
    """Look up a method; an unknown name lists the registered ones."""
    if name not in METHODS:
        raise ConfigError(
            f"unknown unlearning method {name!r}; valid: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]
