"""Per-example likelihood-ratio membership tests for unlearning: U-LiRA and LiRA against the
original (shared/reference/evaluation.md, "LiRA / U-LiRA").

Sources: Carlini et al., "Membership Inference Attacks From First Principles" (LiRA, S&P 2022)
and Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense
of Privacy" (U-LiRA, 2024). The statistic of a model f at a point (x, y) is the logit-scaled
confidence of the true label

    φ(x) = log p_y(x) − log(1 − p_y(x)) = z_y − log Σ_{j≠y} exp z_j,

which is exactly the correct-class margin the evaluation already keeps for KLoM
(:func:`pipeline_lib.attribution.datamodels.margins`). Per example x, Gaussians are fitted to
φ(x) over two populations of shadow models:

- *in*: models whose training involved x. Two choices, both from models the comparison
  already has:
  - ``U-LiRA`` (Hayes et al.): the method's own unlearned models (each original, unlearned):
    the attacker knows the unlearning algorithm and asks "does this model look like an
    unlearned one or like a retrained one?". An exact unlearner scores 0.5; any systematic
    difference, in either direction, raises the AUC.
  - ``LiRA vs original``: the originals (trained with x). The classic LiRA test applied to the
    unlearned model: "does it still look like a model that saw x?". 0.5 for an exact
    unlearner, near the original's own AUC for doing nothing; below 0.5 when the method
    pushed φ past the oracles' (over-forgetting that this one-sided test rewards).
- *out*: the oracles (retrained on R, never saw x).

The score of a target model at x is the log likelihood ratio
Λ = log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out); high Λ says "in". The test is the usual
LiRA game over (model, example) pairs: positives are held-out unlearned models at every forget
point, negatives are held-out oracles at the same points. Every model is held out once
(``n_folds``-fold cross-fitting over the model index: the Gaussians of a fold never use the
models scored in it, nor the original an unlearned model came from). Reported: the ROC AUC
(ties count one half) and the TPR at a fixed low FPR (1% and 0.1%; NaN when there are fewer
than 1/FPR negatives, which cannot resolve that rate).

The variance is per example (``fixed_variance=False``), as the literature does with enough
shadow models; ``fixed_variance=True`` pools one variance per population over all examples,
LiRA's choice for few shadow models (under ~64). σ is floored at ``min_std`` so points where
every shadow model agrees (e.g. clipped margins) give finite scores.

Everything here is numpy on (n_models, T) arrays of φ; nothing is trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_FPRS = (0.01, 0.001)
MIN_STD = 1e-4


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = log p_y − log(1 − p_y) of logits (..., T, C) and labels (T,): (..., T) float64.

    Identical to the correct-class margin (computed stably from the logits, so a confidence of
    1 − 1e-20 keeps its value instead of rounding to +inf)."""
    from pipeline_lib.attribution.datamodels import margins

    return margins(np.asarray(logits), np.asarray(labels))


def _check_phi(name: str, a: np.ndarray, min_models: int = 1) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_models, T); got shape {a.shape}")
    if a.shape[0] < min_models or a.shape[1] < 1:
        raise ValueError(
            f"{name} needs at least {min_models} models (rows) and one point; got shape {a.shape}"
        )
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real-valued; got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} of shape {a.shape} contains non-finite values (nan or inf)")
    return a


def fit_gaussians(
    phi: np.ndarray, fixed_variance: bool = False, min_std: float = MIN_STD
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and standard deviation of φ over the models (rows) of ``phi`` (n, T).

    Returns (μ (T,), σ (T,)); σ is the population standard deviation (ddof 0, as LiRA), floored
    at ``min_std``; with ``fixed_variance`` every example gets the root of the mean per-example
    variance."""
    phi = _check_phi("phi", phi)
    mu = phi.mean(axis=0)
    var = phi.var(axis=0)
    if fixed_variance:
        var = np.full_like(var, var.mean())
    return mu, np.maximum(np.sqrt(var), min_std)


def _log_normal(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)


def likelihood_ratio(
    phi: np.ndarray,
    fit_in: tuple[np.ndarray, np.ndarray],
    fit_out: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out) for every model and point: phi (m, T) →
    (m, T). ``fit_in`` and ``fit_out`` are (μ, σ) pairs from :func:`fit_gaussians`."""
    return _log_normal(phi, *fit_in) - _log_normal(phi, *fit_out)


def _folds(n: int, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold label of each of n models: a seeded permutation dealt round-robin."""
    labels = np.empty(n, dtype=np.intp)
    labels[rng.permutation(n)] = np.arange(n) % n_folds
    return labels


def lira_scores(
    targets: np.ndarray,
    shadow_in: np.ndarray,
    oracles: np.ndarray,
    *,
    n_folds: int = 2,
    seed: int = 0,
    fixed_variance: bool = False,
    min_std: float = MIN_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted log likelihood ratios of the targets (positives) and of held-out oracles
    (negatives).

    targets (N, T): φ of the models under test (unlearned) at T points; shadow_in (N, T): φ of
    the in-population, row k paired with target k (the original target k was unlearned from,
    or the target itself for U-LiRA): the pair shares a fold, so neither is fitted on when the
    other is scored; oracles (N_o, T): φ of the oracles. Each population is split into
    ``n_folds`` seeded folds; fold j's targets and oracles are scored with Gaussians fitted on
    the other folds. Returns (positives (N, T), negatives (N_o, T)) in the input row order."""
    t = _check_phi("targets", targets)
    s = _check_phi("shadow_in", shadow_in)
    o = _check_phi("oracles", oracles)
    if s.shape != t.shape:
        raise ValueError(
            f"shadow_in {s.shape} must pair row for row with targets {t.shape} (same models, same T)"
        )
    if o.shape[1] != t.shape[1]:
        raise ValueError(f"oracles {o.shape} and targets {t.shape} must cover the same T points")
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2; got {n_folds!r}")
    if min(t.shape[0], o.shape[0]) < n_folds:
        raise ValueError(
            f"{n_folds} folds need at least {n_folds} targets and {n_folds} oracles; "
            f"got {t.shape[0]} and {o.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    ft, fo = _folds(t.shape[0], n_folds, rng), _folds(o.shape[0], n_folds, rng)
    pos, neg = np.empty_like(t), np.empty_like(o)
    for j in range(n_folds):
        fit_in = fit_gaussians(s[ft != j], fixed_variance, min_std)
        fit_out = fit_gaussians(o[fo != j], fixed_variance, min_std)
        pos[ft == j] = likelihood_ratio(t[ft == j], fit_in, fit_out)
        neg[fo == j] = likelihood_ratio(o[fo == j], fit_in, fit_out)
    return pos, neg


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie): the Mann–Whitney U statistic
    divided by n_pos·n_neg (the area under the ROC curve). Inputs are flattened."""
    p = np.asarray(positives, dtype=np.float64).ravel()
    n = np.asarray(negatives, dtype=np.float64).ravel()
    if p.size == 0 or n.size == 0:
        raise ValueError(f"roc_auc needs positives and negatives; got {p.size} and {n.size}")
    both = np.concatenate([p, n])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: its block of tied positions
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0
    ranks = avg_rank[inverse]
    u = ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * n.size))


def tpr_at_fpr(positives: np.ndarray, negatives: np.ndarray, fpr: float) -> float:
    """Largest fraction of positives flagged by a threshold that flags at most ``fpr`` of the
    negatives (score > threshold flags). NaN when fewer than 1/fpr negatives exist: such a
    rate cannot be resolved."""
    p = np.asarray(positives, dtype=np.float64).ravel()
    n = np.sort(np.asarray(negatives, dtype=np.float64).ravel())[::-1]
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must lie in (0, 1); got {fpr!r}")
    if n.size * fpr < 1:
        return float("nan")
    k = int(np.floor(fpr * n.size + 1e-9))  # false positives allowed
    threshold = n[k]  # at most k negatives lie strictly above the (k+1)-th largest
    return float(np.mean(p > threshold))


def _fpr_key(fpr: float) -> str:
    return f"tpr_at_{fpr * 100:g}pct_fpr".replace(".", "_")


def membership_summary(
    positives: np.ndarray, negatives: np.ndarray, fprs: Sequence[float] = DEFAULT_FPRS
) -> dict[str, float]:
    """{"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "n_pos", "n_neg"} of a scored test."""
    out = {"auc": roc_auc(positives, negatives)}
    for f in fprs:
        out[_fpr_key(f)] = tpr_at_fpr(positives, negatives, f)
    out["n_pos"] = float(np.size(positives))
    out["n_neg"] = float(np.size(negatives))
    return out


def ulira_auc(
    unlearned: np.ndarray,
    oracles: np.ndarray,
    shadow_in: np.ndarray | None = None,
    *,
    n_folds: int = 2,
    seed: int = 0,
    fixed_variance: bool = False,
    fprs: Sequence[float] = DEFAULT_FPRS,
) -> dict[str, float]:
    """The membership test of unlearned models against oracles at the forget points.

    unlearned (N, |F|), oracles (N_o, |F|): φ (margins) at the forget points. ``shadow_in``
    None: U-LiRA, the in-population is the unlearned models themselves (cross-fitted);
    ``shadow_in`` = the originals (N, |F|), row k the original of unlearned model k: LiRA
    against the original. Returns :func:`membership_summary` (AUC 0.5 = indistinguishable from
    retraining)."""
    pos, neg = lira_scores(
        unlearned,
        unlearned if shadow_in is None else shadow_in,
        oracles,
        n_folds=n_folds,
        seed=seed,
        fixed_variance=fixed_variance,
    )
    return membership_summary(pos, neg, fprs)
