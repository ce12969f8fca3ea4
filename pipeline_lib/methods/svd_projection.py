"""SVD class forgetting (Kodge, Saha, Roy, TMLR 2024, "Deep Unlearning: Fast and Efficient
Gradient-free Class Forgetting"; algorithms.md §5).

Gradient-free: one forward pass over a few retain samples per class and a few samples of the
forgotten class(es) collects every projected layer's input activations
(:mod:`pipeline_lib.stats.activations`: Gram matrices, so memory does not grow with the samples).
Per layer, with U, S the basis and singular values of those activations:

    σ̃_i = S_i² / Σ_j S_j²,    λ_i = α σ̃_i / ((α − 1) σ̃_i + 1),    M = U diag(λ) Uᵀ

M_r from the retain activations with α_r, M_f from the forget activations with α_f. The
class-discriminatory projection removes the forget space minus what it shares with the
retain space, P = I − (M_f − M_f M_r), and every projected layer's weight becomes
W ← W Pᵀ (Conv2d: on the (out, C·k_h·k_w) view, the layout of the unfolded patches).
Biases are unchanged. All activations are collected from the original model before any
weight changes. This follows the authors' reference code point by point (uncentred layer
inputs, σ̃ from S², W·Pᵀ on every Linear/Conv layer including the classifier).

The paper tunes α_r, α_f per model on a grid against test accuracy. ``alpha_r_grid`` /
``alpha_f_grid`` do that selection on the samples the method has already read instead
(highest retain-sample accuracy − forget-sample accuracy; no other data), reusing the Gram
matrices: each candidate costs one projection and one forward pass over those samples.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Annotated

import torch
from torch import nn

from pipeline_lib.evaluation.metrics import accuracy
from pipeline_lib.methods.base import Info, UnlearnInputs, register_method
from pipeline_lib.methods.space import LogUniform
from pipeline_lib.schema import Field, Float, Int, section
from pipeline_lib.stats.activations import activation_grams, decompose_gram, projection_layers
from pipeline_lib.training.fit import predict_logits

log = logging.getLogger(__name__)

PositiveFloat = Annotated[Float, Field(gt=0)]


@section()
class SvdProjectionParams:
    """SVD class forgetting (Kodge et al., TMLR 2024): gradient-free projection of every
    Linear/Conv layer off the class-discriminatory activation space."""

    #: α_r, α_f: scaling of the retain and forget spaces (paper, CIFAR-10: 100 and 3).
    alpha_r: Float = Field(100.0, gt=0)
    alpha_f: Float = Field(3.0, gt=0)
    #: Seeded samples per retained class and per forgotten class (paper: 100 per class).
    retain_per_class: Int = Field(100, gt=0)
    forget_per_class: Int = Field(100, gt=0)
    #: Samples per forward pass (memory only; the result does not depend on it).
    batch_size: Int = Field(256, gt=0)
    #: Optional α search (the paper tunes α_r, α_f per model on a grid; its reference grid is
    #: α_r ∈ {10, 30, 100, 300, 1000}, α_f ∈ {1, 3, 10, 30, 100}). Both empty: use α_r, α_f
    #: as given. Otherwise every pair of the grids (an empty grid = its single α) is tried
    #: and the one with the highest retain-sample accuracy − forget-sample accuracy on the
    #: samples the method already read is kept (no other data is read).
    alpha_r_grid: tuple[PositiveFloat, ...] = ()
    alpha_f_grid: tuple[PositiveFloat, ...] = ()


def scaled_projector(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """M = U diag(λ) Uᵀ (d, d) from a Gram matrix AᵀA (d, d): λ_i = α σ̃_i / ((α−1) σ̃_i + 1),
    σ̃_i = S_i² / Σ S² (the paper's scaled importance of each basis direction)."""
    return _scaled(*decompose_gram(gram), alpha)


def _scaled(u: torch.Tensor, s: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`scaled_projector` from the decomposition (U, S) of the Gram matrix."""
    energy = s.square()
    total = energy.sum()
    if total <= 0:
        return torch.zeros(u.shape[0], u.shape[0], dtype=u.dtype)
    sigma = energy / total
    lam = alpha * sigma / ((alpha - 1.0) * sigma + 1.0)
    return (u * lam) @ u.T


def _projection(m_r: torch.Tensor, m_f: torch.Tensor) -> torch.Tensor:
    return torch.eye(m_r.shape[0], dtype=m_r.dtype) - (m_f - m_f @ m_r)


def class_projection(
    gram_retain: torch.Tensor, gram_forget: torch.Tensor, alpha_r: float, alpha_f: float
) -> torch.Tensor:
    """P = I − (M_f − M_f M_r) (d, d), in float64."""
    return _projection(
        scaled_projector(gram_retain.double(), alpha_r),
        scaled_projector(gram_forget.double(), alpha_f),
    )


def per_class_sample(y: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted row indices: up to ``per_class`` rows of every class in ``y`` (seeded)."""
    rows = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        rows.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.sort(torch.cat(rows)).values if rows else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def project_weights(model: nn.Module, projections: dict[str, torch.Tensor]) -> None:
    """W ← W Pᵀ in place for every layer named in ``projections``."""
    layers = dict(model.named_modules())
    for name, p in projections.items():
        w = layers[name].weight
        flat = w.reshape(w.shape[0], -1)
        w.copy_((flat.double() @ p.T.to(w.device)).to(w.dtype).view_as(w))


@register_method(
    "svd_projection",
    SvdProjectionParams,
    "class forgetting: project layer weights off the class-discriminatory "
    "activation space, gradient-free (Kodge 2024)",
    class_only=True,
    search_space={"alpha_r": LogUniform(10.0, 1000.0), "alpha_f": LogUniform(1.0, 100.0)},
)
def svd_projection(
    model: nn.Module, inputs: UnlearnInputs, params: SvdProjectionParams, seed: int
) -> tuple[nn.Module, Info]:
    """Class forgetting by projection (module docstring). Reads ``retain_per_class`` seeded
    retain samples of every retained class and ``forget_per_class`` of every forgotten class;
    no gradient, no training. Meant for class requests: every class present in the forget set
    is treated as forgotten."""
    if len(inputs.forget_y) == 0 or len(inputs.retain_y) == 0:
        raise ValueError("svd_projection needs forget and retain samples")
    gen = torch.Generator().manual_seed(seed)
    r_rows = per_class_sample(inputs.retain_y, params.retain_per_class, gen)
    f_rows = per_class_sample(inputs.forget_y, params.forget_per_class, gen)
    device = inputs.device
    model.to(device).eval()
    g_r, n_r = activation_grams(model, inputs.retain_X[r_rows], params.batch_size)
    g_f, n_f = activation_grams(model, inputs.forget_X[f_rows], params.batch_size)
    layers = projection_layers(model)
    # the bases do not depend on α: decompose once, build each M once per α (α search)
    bases_r = {n: decompose_gram(g_r[n].double()) for n in layers}
    bases_f = {n: decompose_gram(g_f[n].double()) for n in layers}
    scaled_r = functools.cache(lambda a: {n: _scaled(*bases_r[n], a) for n in layers})
    scaled_f = functools.cache(lambda a: {n: _scaled(*bases_f[n], a) for n in layers})

    def projections_for(alpha_r: float, alpha_f: float) -> dict[str, torch.Tensor]:
        m_r, m_f = scaled_r(alpha_r), scaled_f(alpha_f)
        return {n: _projection(m_r[n], m_f[n]) for n in layers}

    alpha_r, alpha_f, search = params.alpha_r, params.alpha_f, {}
    if params.alpha_r_grid or params.alpha_f_grid:
        rX, ry = inputs.retain_X[r_rows], inputs.retain_y[r_rows]
        fX, fy = inputs.forget_X[f_rows], inputs.forget_y[f_rows]
        bs = params.batch_size
        for a_r in params.alpha_r_grid or (params.alpha_r,):
            for a_f in params.alpha_f_grid or (params.alpha_f,):
                trial = copy.deepcopy(model)
                project_weights(trial, projections_for(a_r, a_f))
                search[(a_r, a_f)] = accuracy(predict_logits(trial, rX, bs), ry) - accuracy(
                    predict_logits(trial, fX, bs), fy
                )
        # best score; ties go to the larger α_r, then the smaller α_f (the gentler edit)
        alpha_r, alpha_f = max(search, key=lambda k: (search[k], k[0], -k[1]))
        log.info(
            "svd_projection: α search over %d pairs chose α_r=%g, α_f=%g (score %.1f)",
            len(search),
            alpha_r,
            alpha_f,
            search[(alpha_r, alpha_f)],
        )
    projections = projections_for(alpha_r, alpha_f)
    project_weights(model, projections)
    removed = {
        n: float(torch.linalg.matrix_norm(torch.eye(len(p), dtype=p.dtype) - p, 2))
        for n, p in projections.items()
    }
    log.info(
        "svd_projection: %d layers projected from %d retain / %d forget samples",
        len(projections),
        n_r,
        n_f,
    )
    return model, {
        "n_layers": len(projections),
        "n_retain_samples": n_r,
        "n_forget_samples": n_f,
        "max_removed_norm": max(removed.values()),
        "alpha_r": alpha_r,
        "alpha_f": alpha_f,
        "alpha_candidates": len(search) or 1,
        **({"alpha_search_score": search[(alpha_r, alpha_f)]} if search else {}),
    }
