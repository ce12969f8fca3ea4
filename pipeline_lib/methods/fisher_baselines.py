"""Baselines on the shared Fisher statistics (algorithms.md §1, "close relatives").

Both read only I_F and I_R (the per-sample Fisher diagonals the pipeline's Fisher step, or
``unlearn stats fisher``, computes once per request and model) and change the weights in one
step: no fine-tuning, no pass over the data.

- :func:`ssd`: Selective Synaptic Dampening (Foster, Schoepf, Brintrup, AAAI 2024).
- :func:`fisher_forgetting`: Fisher forgetting (Golatkar, Achille, Soatto, CVPR 2020,
  "Eternal Sunshine of the Spotless Net").
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline_lib.methods.base import Info, UnlearnInputs, register_method
from pipeline_lib.methods.space import LogUniform
from pipeline_lib.schema import Field, Float, section

log = logging.getLogger(__name__)


@section()
class SsdParams:
    """Selective Synaptic Dampening (Foster et al., AAAI 2024) on the shared Fisher stats."""

    #: α: select θ_i with I_F,i > alpha · I_D,i. The paper's 10 is for squared mini-batch
    #: gradients; with the per-sample Fisher I_F/I_D <= |D|/|F|, so alpha must be below
    #: |D|/|F| (10 for one class of ten): 2 here (BENCHMARKS.md).
    alpha: Float = Field(2.0, gt=0)
    #: λ: dampen the selected to θ_i · min(lam · I_D,i / I_F,i, 1) (paper: 1).
    lam: Float = Field(1.0, gt=0)


@section()
class FisherForgettingParams:
    """Fisher forgetting (Golatkar et al., CVPR 2020): θ + sqrt(α·min(1/(I_R+ε), v_max))·N(0,1)."""

    alpha: Float = Field(1e-6, ge=0)
    eps: Float = Field(1e-8, gt=0)
    #: v_max: clamp of 1/(I_R+ε) before scaling by α (the authors' code: 1e3).
    var_clamp: Float = Field(1000.0, gt=0)


def _fisher(inputs: UnlearnInputs, name: str) -> tuple[dict, dict]:
    if inputs.fisher_forget is None or inputs.fisher_retain is None:
        raise ValueError(f"{name} needs the forget and retain Fisher diagonals")
    if inputs.fisher_forget.keys() != inputs.fisher_retain.keys():
        raise ValueError("forget and retain Fisher statistics cover different parameters")
    return inputs.fisher_forget, inputs.fisher_retain


def ssd_dampen(
    model: nn.Module,
    importance_forget: dict[str, torch.Tensor],
    importance_all: dict[str, torch.Tensor],
    alpha: float,
    lam: float,
) -> tuple[int, int]:
    """SSD's update, in place: for every weight with I_F,i > α·I_D,i,
    θ_i ← θ_i · min(λ·I_D,i / I_F,i, 1); all other weights unchanged.
    Returns (weights dampened, weights in total)."""
    named = dict(model.named_parameters())
    chosen = total = 0
    with torch.no_grad():
        for k, p in named.items():
            i_f = importance_forget[k].to(p.device, p.dtype)
            i_d = importance_all[k].to(p.device, p.dtype)
            select = i_f > alpha * i_d
            # select implies i_f > 0, so the ratio is finite where it is used
            beta = torch.where(select, (lam * i_d / i_f.clamp_min(1e-300)).clamp(max=1.0), 1.0)
            p.mul_(beta)
            chosen += int(select.sum())
            total += p.numel()
    return chosen, total


@register_method(
    "ssd",
    SsdParams,
    "dampen weights with I_F > alpha*I_D by min(lambda*I_D/I_F, 1) (SSD)",
    needs_fisher=True,
    search_space={"alpha": LogUniform(0.5, 20.0), "lam": LogUniform(0.1, 5.0)},
)
def ssd(
    model: nn.Module, inputs: UnlearnInputs, params: SsdParams, seed: int
) -> tuple[nn.Module, Info]:
    """Selective Synaptic Dampening (Foster et al., AAAI 2024; algorithms.md §1).

    Importances are diagonals of the Fisher information: []_F = I_F of the forget set and
    []_D of the whole training set D = F ∪ R, here the size-weighted mean
    I_D = (|F|·I_F + |R|·I_R) / (|F| + |R|) of the shared statistics (I_R is a mean over R or
    its seeded subsample, so it estimates the mean over all of R). The paper squares
    mini-batch gradients of the loss; this uses the per-sample Fisher diagonal of the
    pipeline's Fisher step (``fisher.kind``), the quantity it approximates.

    Selection and dampening: θ_i with I_F,i > α·I_D,i are multiplied by
    min(λ·I_D,i / I_F,i, 1). λ = 1 as in the paper. The paper's α = 10 is calibrated for
    squared mini-batch gradients, where mixed-class batches cancel and forget batches do not;
    with per-sample Fisher diagonals I_F/I_D <= (|F|+|R|)/|F| for every weight, so α must be
    below that bound (10 when one class of ten is forgotten) or nothing is selected (logged as
    a warning). Default α = 2 (chosen on digits, BENCHMARKS.md). Deterministic (``seed``
    unused).
    """
    i_f, i_r = _fisher(inputs, "ssd")
    n_f, n_r = len(inputs.forget_y), len(inputs.retain_y)
    if n_f + n_r == 0:
        raise ValueError("ssd needs the sizes of the forget and retain sets")
    i_d = {k: (n_f * i_f[k] + n_r * i_r[k]) / (n_f + n_r) for k in i_f}
    bound = (n_f + n_r) / max(n_f, 1)
    if params.alpha >= bound:
        log.warning(
            "ssd: alpha=%g >= |D|/|F| = %.3g: no weight can have I_F > alpha*I_D",
            params.alpha,
            bound,
        )
    chosen, total = ssd_dampen(model, i_f, i_d, params.alpha, params.lam)
    log.info(
        "ssd: dampened %d of %d weights (alpha=%g, lambda=%g)",
        chosen,
        total,
        params.alpha,
        params.lam,
    )
    return model, {"n_dampened": chosen, "fraction_dampened": chosen / total}


@register_method(
    "fisher_forgetting",
    FisherForgettingParams,
    "Gaussian noise with variance alpha/(I_R+eps), clamped (Golatkar 2020)",
    needs_fisher=True,
    search_space={"alpha": LogUniform(1e-9, 1e-4)},
)
def fisher_forgetting(
    model: nn.Module, inputs: UnlearnInputs, params: FisherForgettingParams, seed: int
) -> tuple[nn.Module, Info]:
    """Fisher forgetting (Golatkar et al., CVPR 2020, §"Fisher forgetting"; algorithms.md §1).

    The optimal quadratic scrubbing with a diagonal Fisher: add Gaussian noise whose variance
    is inversely proportional to the retain-set Fisher, so weights the retain data needs
    barely move and weights only the forget data needed are drowned:

        θ ← θ + sqrt(α · min(1 / (I_R + ε), v_max)) · N(0, 1)

    ``alpha`` (α, paper ≈ 1e-6), ``eps`` (1e-8) and the variance clamp ``var_clamp``
    (v_max = 1e3 as in the authors' code) are parameters; the noise is drawn with ``seed``.
    I_F is not used by the update (only I_R is), but is checked to be present so that the
    method runs on the same shared statistics as the others.
    """
    _, i_r = _fisher(inputs, "fisher_forgetting")
    gen = torch.Generator().manual_seed(seed)
    noise_norm = 0.0
    with torch.no_grad():
        for k, p in model.named_parameters():
            var = params.alpha * (1.0 / (i_r[k].double().cpu() + params.eps)).clamp(
                max=params.var_clamp
            )
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * var.sqrt()
            p.add_(noise.to(p.device, p.dtype))
            noise_norm += float(noise.square().sum())
    log.info("fisher_forgetting: noise norm %.4g (alpha=%g)", noise_norm**0.5, params.alpha)
    return model, {"noise_norm": noise_norm**0.5}
