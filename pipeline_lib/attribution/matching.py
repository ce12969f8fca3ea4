"""Output matching: Datamodel Matching (DMM) and Oracle Matching (OM).

Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching" (ICLR 2025,
arXiv 2410.23232; algorithms.md §2). Both methods fine-tune a copy of the trained model so that
its logits on a set of *matching points* — the forget points plus ``retain_multiple``·|F|
random retain points — match target logits by mean squared error:

- **DMM**: the targets are DM-Direct predictions of the retrained model,
  f̂(x) = f_θ(x) − Σ_{i∈F} β(x)_i, with β the linear datamodels fitted on the attribution
  store's subset models (:func:`datamodel_targets`).
- **OM**: the targets are the mean logits of models really retrained on R
  (:func:`oracle_targets`) — the upper bound that shows what exact attribution would give.

Reference settings (the paper's): Adam, lr 5e-4, 5 epochs, batch 512, learning rate × 0.95
per epoch, no weight regulariser (λ = 0); all are in ``params.yaml`` (``unlearn.dmm``,
``unlearn.oracle_matching``).

Targets are computed before the method runs (they need the attribution store or the oracle
models, which the pipeline provides); the method itself only sees the matching points and
their targets (:class:`MatchTargets`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.attribution.datamodels import forget_shift_direct
from pipeline_lib.denormals import flush_denormals


@dataclass(frozen=True)
class MatchTargets:
    """Matching points and their target logits.

    X (P, *shape) float32 points, logits (P, C) float32 targets; the first ``n_forget`` rows
    are the forget points. ``source`` says where the targets came from ("datamodels" or
    "oracles"); ``seconds`` is the time spent computing them (part of the method's cost).
    """

    X: torch.Tensor
    logits: torch.Tensor
    n_forget: int
    source: str
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.X.shape[0] != self.logits.shape[0]:
            raise ValueError(
                f"matching points ({self.X.shape[0]}) and target logits ({self.logits.shape[0]}) differ in number"
            )
        if not 0 < self.n_forget <= self.X.shape[0]:
            raise ValueError(f"n_forget must be in [1, {self.X.shape[0]}], got {self.n_forget}")
        if not torch.isfinite(self.logits).all():
            raise ValueError(f"target logits from {self.source} contain NaN or inf")


def matching_retain_rows(
    n_forget: int, n_retain: int, multiple: float, seed: int, minimum: int = 0
) -> np.ndarray:
    """Sorted rows of the retain set used as matching points:
    min(n_retain, max(minimum, round(multiple·|F|))) drawn without replacement with
    ``np.random.default_rng(seed)`` (``minimum`` 0: DMM's draw)."""
    if n_forget < 1:
        raise ValueError("the forget set is empty")
    if multiple < 0:
        raise ValueError(f"retain_multiple must be >= 0, got {multiple}")
    k = min(n_retain, max(int(minimum), int(round(multiple * n_forget))))
    return np.sort(np.random.default_rng(seed).choice(n_retain, size=k, replace=False))


def full_model_anchor(
    masks: np.ndarray,
    store_outputs: np.ndarray,
    full_logits: Any,
    n_forget: int,
    lam: float = 1.0,
    estimator: str = "ridge_dual",
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """|F|·κ, float64 of ``full_logits``' shape ((P, C), or (K, P, C) for K trained models):
    the part of Σ_{i∈F} β_i that fixed-size subsets leave unidentified, fixed by making the
    datamodel reproduce the trained model at S = D.

    Every subset of the store has αN points, so adding κ to every β_i changes none of the
    store's predictions; the fitted datamodels take the minimum-norm β (Σ_i β_i = 0, module
    docstring of :mod:`pipeline_lib.attribution.datamodels`). Such a datamodel predicts about
    the mean subset-model output at S = D, not the trained model's f_θ, so DM-Direct's
    f_θ − Σ_F β — the datamodel's own prediction at R only when it is right at D — leaves out
    the effect of training on fewer points (|R| = N − |F|). The trained model itself is one
    more observation, a model whose subset is all of D; spreading the datamodel's residual
    there over the points, β_i + κ with κ = (f_θ − f̂(D)) / Σ_i (1 − x̄_i) and
    f̂(D) = ȳ + Σ_i (1 − x̄_i) β_i, makes it exact at D and leaves every store prediction
    unchanged (the linear datamodel of algorithms.md §2 with its free direction pinned).
    For exactly-αN subsets and ridge, f̂(D) ≈ ȳ and |F|·κ ≈ |F| / ((1 − α)N) · (f_θ − ȳ): a
    linear step along the training-set size axis from the full model towards the α-subset
    models' mean. When inclusion is not of fixed size the free direction is identified and
    the residual (so the anchor) of an exactly linear world is 0."""
    masks = np.asarray(masks)
    out = np.asarray(store_outputs)
    n_models, n_train = masks.shape
    if not 0 <= n_forget < n_train:
        raise ValueError(f"|F| must be in [0, {n_train}), got {n_forget}")
    centre = np.count_nonzero(masks, axis=0) / n_models
    rest = 1.0 - centre
    at_full = out.astype(np.float64).mean(axis=0) + forget_shift_direct(
        masks, out, np.arange(n_train), lam=lam, estimator=estimator, factor=factor, weights=rest
    )
    full = np.asarray(full_logits, dtype=np.float64)
    if full.shape[-at_full.ndim :] != at_full.shape:
        raise ValueError(f"full logits {full.shape} do not end in the store's {at_full.shape}")
    return n_forget / rest.sum() * (full - at_full)


def datamodel_targets(
    masks: np.ndarray,
    store_outputs: np.ndarray,
    full_logits: Any,
    forget_positions: np.ndarray,
    lam: float = 1.0,
    estimator: str = "ridge_dual",
    factor: np.ndarray | None = None,
    anchor: bool = False,
    anchor_logits: Any = None,
) -> np.ndarray:
    """DM-Direct targets (m = 1) for P matching points: f̂ = f_θ − Σ_{i∈F} β_i, (P, C) float64.

    masks (M, N) bool — the training subsets of the store's models; store_outputs (M, P, C)
    — their logits on the matching points; full_logits (P, C) — the trained model's logits
    on the same points; forget_positions — the forget points' positions in the store's
    training order (0..N-1). The linear datamodels are per (point, class) on the logits.
    ``factor``: the store's precomputed ridge factor (:func:`datamodels.ridge_factor`).
    ``anchor``: β's unidentified common part taken from the trained model
    (:func:`full_model_anchor`) instead of 0; ``anchor_logits`` (P, C): the full-data outputs
    that pin it, when not ``full_logits`` (the mean of reference models trained on D).
    """
    masks = np.asarray(masks)
    out = np.asarray(store_outputs)
    if out.ndim != 3 or out.shape[0] != masks.shape[0]:
        raise ValueError(
            f"store outputs must be (M, P, C) with M = {masks.shape[0]} models; got {out.shape}"
        )
    full = np.asarray(full_logits, dtype=np.float64)
    if full.shape != out.shape[1:]:
        raise ValueError(
            f"full logits shape {full.shape} does not match the store's {out.shape[1:]}"
        )
    # DM-Direct f − Σ_F β via the one-right-hand-side solve (datamodels.forget_shift_direct,
    # tested equal to dm_direct on fitted datamodels)
    targets = full - forget_shift_direct(
        masks, out, forget_positions, lam=lam, estimator=estimator, factor=factor
    )
    if anchor:
        pin = full if anchor_logits is None else np.asarray(anchor_logits, dtype=np.float64)
        if pin.shape != full.shape:
            raise ValueError(f"anchor logits shape {pin.shape} does not match {full.shape}")
        targets -= full_model_anchor(masks, out, pin, len(forget_positions), lam, estimator, factor)
    return targets


def oracle_targets(oracle_logits: Any) -> np.ndarray:
    """OM targets: the mean over oracles of their logits, (K, P, C) → (P, C) float64."""
    z = np.asarray(oracle_logits, dtype=np.float64)
    if z.ndim != 3 or z.shape[0] < 1:
        raise ValueError(f"oracle logits must be (K >= 1, P, C); got {z.shape}")
    return z.mean(axis=0)


@flush_denormals()
def match_outputs(
    model: nn.Module,
    targets: MatchTargets,
    epochs: int,
    lr: float,
    batch_size: int,
    lr_decay: float,
    weight_reg: float,
    seed: int,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place: minimise MSE(f_θ(x), target(x)) over the matching points
    (+ ``weight_reg``·‖θ − θ₀‖²), Adam, seeded shuffling, learning rate × ``lr_decay`` after
    every epoch. Returns the mean squared error before and after, on the forget points and
    on all matching points."""
    device = device or torch.device("cpu")
    model.to(device)
    X, T = targets.X.to(device), targets.logits.to(device=device, dtype=torch.float32)
    theta0 = [p.detach().clone() for p in model.parameters()] if weight_reg > 0 else []
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    gen = torch.Generator().manual_seed(seed)

    def errors() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            e = ((model(X) - T) ** 2).mean(dim=1)
        return float(e[: targets.n_forget].mean()), float(e.mean())

    before_f, before_all = errors()
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(X.shape[0], generator=gen).split(batch_size):
            rows = rows.to(device)
            loss = nn.functional.mse_loss(model(X[rows]), T[rows])
            if weight_reg > 0:
                loss = loss + weight_reg * sum(
                    ((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), theta0, strict=True)
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    after_f, after_all = errors()
    model.eval()
    return {
        "mse_forget_before": before_f,
        "mse_forget_after": after_f,
        "mse_all_before": before_all,
        "mse_all_after": after_all,
        "finetune_seconds": seconds,
        "target_seconds": targets.seconds,
        "n_matching_points": int(X.shape[0]),
    }
