"""SalUn (Fan et al., ICLR 2024): saliency-masked random-label fine-tuning."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline_lib.methods.base import Info, UnlearnInputs, register_method, top_fraction_mask
from pipeline_lib.methods.space import IntRange, LogUniform, Uniform
from pipeline_lib.schema import Field, Float, Int, section
from pipeline_lib.training.fit import FitSettings, fit

log = logging.getLogger(__name__)


@section()
class SalunParams:
    """SalUn (Fan et al., ICLR 2024): saliency-masked random-label fine-tuning; Adam."""

    #: Fraction of all weights (largest |∇ CE on F|) that may move; paper range 0.1–0.5.
    saliency_fraction: Float = Field(0.5, gt=0, le=1)
    epochs: Int = Field(5, ge=0)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(64, gt=0)


def forget_saliency(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency |∇_θ Σ_{x∈F} CE(f_θ(x), y)| ({name: tensor of the weight's
    shape}), from one pass over the forget set (X (N, *shape), y (N,)) in eval mode."""
    model.to(device).eval()
    named = dict(model.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in named.items()}
    for start in range(0, len(y), batch_size):
        xb, yb = X[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum")
        for k, g in zip(named, torch.autograd.grad(loss, list(named.values())), strict=True):
            grads[k] += g
    return {k: g.abs() for k, g in grads.items()}


def random_other_labels(y: torch.Tensor, n_classes: int, seed: int) -> torch.Tensor:
    """Labels drawn uniformly from the classes other than ``y`` (N,), seeded."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n_classes, y.shape, generator=gen)
    return (y + shift) % n_classes


@register_method(
    "salun",
    SalunParams,
    "fine-tune the most forget-salient weights on random-labelled F plus R",
    search_space={
        "saliency_fraction": Uniform(0.1, 0.5),
        "epochs": IntRange(1, 10),
        "lr": LogUniform(1e-4, 1e-2),
    },
)
def salun(
    model: nn.Module, inputs: UnlearnInputs, params: SalunParams, seed: int
) -> tuple[nn.Module, Info]:
    """SalUn (Fan et al., ICLR 2024, "SalUn: Empowering machine unlearning via gradient-based
    weight saliency"), random-label variant.

    1. Saliency s_i = |∂/∂θ_i Σ_{x∈F} CE(f_θ(x), y)| (:func:`forget_saliency`).
    2. Mask m = the top ``saliency_fraction`` of all weights by s (exactly
       round(fraction · n_params) of them, :func:`top_fraction_mask`).
    3. Fine-tune only the masked weights (the shared masked loop :func:`fit`, CE, Adam) on
       F relabelled uniformly at random among the *other* classes (seeded), together with R,
       for ``epochs`` epochs. Unmasked weights keep their exact values.
    """
    saliency = forget_saliency(
        model, inputs.forget_X, inputs.forget_y, params.batch_size, inputs.device
    )
    masks, cutoff = top_fraction_mask(saliency, params.saliency_fraction)
    with torch.no_grad():
        n_classes = int(model(inputs.forget_X[:1].to(inputs.device)).shape[-1])
    random_y = random_other_labels(inputs.forget_y, n_classes, seed)
    X = torch.cat([inputs.forget_X, inputs.retain_X])
    y = torch.cat([random_y, inputs.retain_y])
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(model, X, y, settings, seed, grad_mask=masks, device=inputs.device)
    n_masked = int(sum(int(m.sum()) for m in masks.values()))
    n_total = int(sum(m.numel() for m in masks.values()))
    log.info("salun: %d of %d weights masked (saliency >= %.4g)", n_masked, n_total, cutoff)
    return model, {
        "n_masked": n_masked,
        "fraction_masked": n_masked / n_total,
        "saliency_cutoff": cutoff,
    }
