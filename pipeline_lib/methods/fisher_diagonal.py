"""DeepClean Fisher-diagonal forgetting (arXiv 2311.10448; algorithms.md §1)."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from pipeline_lib.attribution.matching import matching_retain_rows
from pipeline_lib.methods.base import Info, UnlearnInputs, register_method, top_fraction_mask
from pipeline_lib.methods.space import IntRange, LogUniform
from pipeline_lib.schema import ConfigError, Field, Float, Int, section
from pipeline_lib.training.fit import FitSettings, fit

log = logging.getLogger(__name__)


@section()
class FisherDiagonalParams:
    """DeepClean Fisher-diagonal forgetting (algorithms.md §1)."""

    #: γ: reset weights with I_F/(I_R+ε) > threshold. Null: use ``top_fraction`` instead.
    threshold: Float | None = None
    #: Fraction of weights with the largest ratio to reset when ``threshold`` is null.
    top_fraction: Float = Field(0.2, gt=0, le=1)
    eps: Float = Field(1e-8, ge=0)
    #: Value the selected weights restart from (the paper leaves it open).
    reset: Literal["zero", "reinit"] = "zero"
    epochs: Int = Field(5, ge=0)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(64, gt=0)
    #: k: fine-tune on a seeded retain subsample of k·|F| points (as DMM matches on
    #: 3·|F| retain points), so the fine-tuning cost scales with the forget set; null: the
    #: whole retain set.
    retain_sample_multiple: Float | None = Field(None, gt=0)
    #: With ``retain_sample_multiple``: at least this many retain points (a small request's
    #: k·|F| can be too few to restore the reset weights; BENCHMARKS.md, Fashion-MNIST CNN).
    retain_sample_min: Int = Field(0, ge=0)


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
    return top_fraction_mask(ratio, top_fraction)


@register_method(
    "fisher_diagonal",
    FisherDiagonalParams,
    "reset weights with high forget/retain Fisher ratio, fine-tune them on R",
    needs_fisher=True,
    search_space={
        "top_fraction": LogUniform(0.01, 0.5),
        "epochs": IntRange(1, 10),
        "lr": LogUniform(1e-4, 1e-2),
        # k of the k·|F| retain subsample: 3 suits digits' 10% request, 10 a 1% request on
        # Fashion-MNIST 60k (BENCHMARKS.md, issue 15)
        "retain_sample_multiple": LogUniform(1.0, 30.0),
    },
)
def fisher_diagonal_forgetting(
    model: nn.Module, inputs: UnlearnInputs, params: FisherDiagonalParams, seed: int
) -> tuple[nn.Module, Info]:
    """DeepClean Fisher-diagonal forgetting (arXiv 2311.10448; algorithms.md §1).

    1. r_i = I_F(θ_i) / (I_R(θ_i) + ε) from the per-sample Fisher diagonals of F and R.
    2. Weights with r_i > γ (or the ``top_fraction`` largest r_i) are the forget-sensitive
       ones: reset them — to zero (default; the paper leaves it open), or to a fresh
       initialisation drawn with ``seed``. On digits zero forgets more at equal test
       accuracy (BENCHMARKS.md).
    3. Fine-tune only those weights on R for ``epochs`` epochs, all others frozen; with
       ``retain_sample_multiple`` k, on min(|R|, max(``retain_sample_min``, round(k·|F|)))
       retain points drawn with
       ``seed`` (:func:`pipeline_lib.attribution.matching.matching_retain_rows`, DMM's draw)
       instead of all of R.
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
    rX, ry = inputs.retain_X, inputs.retain_y
    if params.retain_sample_multiple is not None:
        rows = torch.from_numpy(
            matching_retain_rows(
                len(inputs.forget_y),
                len(ry),
                params.retain_sample_multiple,
                seed,
                minimum=params.retain_sample_min,
            )
        )
        rX, ry = rX[rows], ry[rows]
    fit(
        model,
        rX,
        ry,
        settings,
        seed,
        grad_mask=masks,
        device=inputs.device,
    )
    info: Info = {"n_reset": n_reset, "fraction_reset": n_reset / n_total, "gamma": gamma}
    return model, {**info, "n_finetune": len(ry)}
