"""KLoM: KL divergence of margins (shared/reference/evaluation.md, section "KLoM").

Source: Georgiev et al., "Attribute-to-Delete: Machine Unlearning via Datamodel Matching"
(ICLR 2025), and its benchmark code "data-unlearning-bench". For each point x, take the
margins of N_u unlearned models and N_o oracle models (retrained on the retain set R):

1. clip both samples to [-clip, clip] (clip = 100);
2. build ``bins`` (20) equal-width bins over the combined range [min, max] of both clipped
   samples at x; if that range is zero both samples are one identical value and KLoM(x) = 0;
3. histogram probabilities p (unlearned) and q (oracle), each count divided by its sample size;
4. floor every probability at ``floor`` (1e-5) and then renormalise so each sums to 1 (as the
   reference does; the floor keeps log(p/q) finite where one sample leaves a bin empty);
5. KLoM(x) = KL(P_unlearned || P_oracle) = sum_b p_b log(p_b / q_b).

Report P95 (also P99 and mean) separately over forget, retain and validation points, with the
oracle-vs-oracle noise floor (:func:`noise_floor`) beside every figure: for finite N the floor
is well above 0. Note that the floor compares two halves of N_o // 2 oracles each, so it is the
floor at half the sample size and is somewhat higher than the floor at N_o itself.

Binning follows ``np.histogram(x, bins=bins, range=(lo, hi))`` exactly (half-open bins, last
bin closed, the same edge corrections), vectorised over the T points.

Two binnings (``binning``, ``evaluate.klom_binning``):

- ``"unlearnflow"`` (default): the steps above. Every margin is counted (the last bin is
  closed, as ``np.histogram`` has it), and both histograms are floored and renormalised, so
  KLoM is a KL divergence between two proper distributions on the same 20 bins.
- ``"easydub"``: the formula of EasyDUB's published code (``binned_kl_divergence`` in
  easydub/EasyDUB-code, same combined range, clip and 20 bins), reproduced exactly so that
  figures can be set beside published ones. It differs in three ways:

  1. bins are assigned by ``np.digitize(x, edges)`` and only indices 1..bins are counted, so
     every margin equal to the pooled maximum (the last edge) is dropped: at least one model
     at every point, and up to all of one side's models where they share the maximum (e.g.
     clipped at +100). The dropped sample belongs to one side only, so the two histograms are
     built from different subsets of the models;
  2. probabilities are counts ÷ the *counted* samples (0 everywhere when none is counted);
  3. only q (the oracles') is floored at ``floor``, and only in bins where p > 0; neither is
     renormalised afterwards, and KL sums over the bins where p > 0 (so a value can dip a
     hair below 0; it is not clipped).

  A zero combined range is widened to [lo, lo + 1] (everything in the first bin: KLoM 0), as
  there. EasyDUB computes in its margins' dtype; here margins are cast to float64 first
  (identical for float64 margins).

  Why ours differs: dropping the pooled maximum removes a real sample — usually the most
  confident model at that point, which is exactly where unlearned and oracle models differ on
  forget points — from one side only, and adds up to 1/N of spurious mass difference; at
  N = 20 the two binnings differ by up to 0.82 per point and 0.13 in P95 (issue 16). The
  symmetric floor keeps KLoM a divergence between two distributions on the same support,
  as shared/reference/evaluation.md defines it ("probabilities with a floor of 1e-5"); the
  earlier data-unlearning-bench code (``scipy.stats.entropy``) renormalised too.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SUMMARY_KEYS = ("p95", "p99", "mean")
#: ``binning`` values: ours, and EasyDUB's published formula (module docstring).
BINNINGS = ("unlearnflow", "easydub")

Split = np.ndarray


def _check_margins(name: str, m: np.ndarray, min_models: int = 2) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_models, T); got shape {m.shape}")
    if m.shape[0] < min_models:
        raise ValueError(f"{name} needs at least {min_models} models (rows); got shape {m.shape}")
    if m.shape[1] < 1:
        raise ValueError(f"{name} needs at least one point (column); got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.number) or np.issubdtype(m.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real-valued; got dtype {m.dtype}")
    m = m.astype(np.float64, copy=False)
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} of shape {m.shape} contains non-finite values (nan or inf)")
    return m


def _check_params(bins: int, clip: float, floor: float, binning: str = "unlearnflow") -> None:
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {', '.join(BINNINGS)}; got {binning!r}")
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be a positive integer; got {bins!r}")
    if not (np.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number; got {clip!r}")
    if not (0 < floor < 1.0 / bins):
        raise ValueError(f"floor must lie in (0, 1/bins) = (0, {1.0 / bins}); got {floor!r}")


def _bin_indices(x: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each value, as ``np.histogram`` with equal-width bins assigns it.

    x: (T, N) values inside [edges[:, 0], edges[:, -1]]; edges: (T, bins + 1). Returns (T, N)
    integer indices in [0, bins). Mirrors numpy's ``_histogram`` fast path: the index is
    floor((x - lo) / (hi - lo) * bins), then corrected by one where rounding put a value on the
    wrong side of the edge that ``np.linspace`` produced.
    """
    lo = edges[:, :1]
    hi = edges[:, -1:]
    idx = (((x - lo) / (hi - lo)) * bins).astype(np.intp)
    idx[idx == bins] -= 1
    idx = np.clip(idx, 0, bins - 1)
    idx[x < np.take_along_axis(edges, idx, axis=1)] -= 1
    inc = (x >= np.take_along_axis(edges, idx + 1, axis=1)) & (idx != bins - 1)
    idx[inc] += 1
    return idx


def _probabilities(idx: np.ndarray, bins: int, floor: float) -> np.ndarray:
    """Floored, renormalised histogram probabilities per row.

    idx: (T, N) bin indices in [0, bins). Returns (T, bins) float64 rows summing to 1:
    counts / N, floored at ``floor``, then divided by the row sum.
    """
    t, n = idx.shape
    flat = idx + bins * np.arange(t)[:, None]
    counts = np.bincount(flat.ravel(), minlength=t * bins).reshape(t, bins)
    p = np.maximum(counts / n, floor)
    return p / p.sum(axis=1, keepdims=True)


def _digitize_counts(x: np.ndarray, edges: np.ndarray, bins: int, chunk: int = 2048) -> np.ndarray:
    """Counts of ``np.digitize(x, edges)`` == 1..bins per row, as EasyDUB counts them.

    x: (T, N); edges: (T, bins + 1) increasing. ``np.digitize`` (right=False) is the number of
    edges <= x; values at or above the last edge get bins + 1 and are not counted. Returns
    (T, bins) int64. Chunked over T to bound the (T, N, bins + 1) comparison."""
    t = x.shape[0]
    counts = np.zeros((t, bins), dtype=np.int64)
    for a in range(0, t, chunk):
        idx = (x[a : a + chunk, :, None] >= edges[a : a + chunk, None, :]).sum(axis=2)
        for b in range(1, bins + 1):
            counts[a : a + chunk, b - 1] = (idx == b).sum(axis=1)
    return counts


def _kl_easydub(
    u: np.ndarray, o: np.ndarray, edges: np.ndarray, bins: int, floor: float
) -> np.ndarray:
    """EasyDUB's per-point KL (module docstring): u (T, N_u), o (T, N_o) clipped margins."""
    pc, qc = _digitize_counts(u, edges, bins), _digitize_counts(o, edges, bins)
    pt, qt = pc.sum(axis=1, keepdims=True), qc.sum(axis=1, keepdims=True)
    p = np.where(pt > 0, pc / np.maximum(pt, 1), 0.0)
    q = np.where(qt > 0, qc / np.maximum(qt, 1), 0.0)
    mask = p > 0
    q_safe = np.where(mask, np.maximum(q, floor), q)
    ratio = np.where(mask, p / np.where(mask, q_safe, 1.0), 1.0)
    return np.sum(np.where(mask, p * np.log(ratio), 0.0), axis=1)


def klom_scores(
    unlearned_margins: np.ndarray,
    oracle_margins: np.ndarray,
    bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    binning: str = "unlearnflow",
) -> np.ndarray:
    """KLoM(x) = KL(P_unlearned || P_oracle) of binned margins at every point x (DMM, ICLR 2025).

    unlearned_margins: (N_u, T) margins of N_u unlearned models on T points.
    oracle_margins: (N_o, T) margins of N_o oracle (retrained-on-R) models on the same T points.
    Both are clipped to [-clip, clip]; ``bins`` equal-width bins span the combined range of both
    samples at each point; probabilities are floored at ``floor`` and renormalised. Points whose
    combined range is zero get 0. Returns (T,) float64, every entry >= 0. ``binning="easydub"``:
    EasyDUB's published formula instead (module docstring; entries may dip a hair below 0).
    """
    u = _check_margins("unlearned_margins", unlearned_margins)
    o = _check_margins("oracle_margins", oracle_margins)
    if u.shape[1] != o.shape[1]:
        raise ValueError(
            f"unlearned_margins {u.shape} and oracle_margins {o.shape} must cover the same T points"
        )
    _check_params(bins, clip, floor, binning)

    u = np.clip(u, -clip, clip).T  # (T, N_u)
    o = np.clip(o, -clip, clip).T  # (T, N_o)
    lo = np.minimum(u.min(axis=1), o.min(axis=1))
    hi = np.maximum(u.max(axis=1), o.max(axis=1))
    degenerate = hi == lo
    # a stand-in range keeps the arithmetic finite; those points are set to 0 below (EasyDUB
    # widens a zero range to [lo, lo + 1] in the same way and gets 0 from it)
    hi = np.where(degenerate, lo + 1.0, hi)
    edges = np.linspace(lo, hi, bins + 1, axis=1)  # (T, bins + 1), as np.histogram builds them
    if binning == "easydub":
        return _kl_easydub(u, o, edges, bins, floor)

    p = _probabilities(_bin_indices(u, edges, bins), bins, floor)
    q = _probabilities(_bin_indices(o, edges, bins), bins, floor)
    kl = np.sum(p * np.log(p / q), axis=1)
    # KL >= 0 in exact arithmetic; rounding can leave a tiny negative when p == q nearly
    kl = np.maximum(kl, 0.0)
    kl[degenerate] = 0.0
    return kl


def _klom_point_reference(
    u: np.ndarray, o: np.ndarray, bins: int = 20, clip: float = 100.0, floor: float = 1e-5
) -> float:
    """Slow, obviously-correct KLoM at one point; u: (N_u,), o: (N_o,). Tests compare to it."""
    u = np.clip(np.asarray(u, dtype=np.float64), -clip, clip)
    o = np.clip(np.asarray(o, dtype=np.float64), -clip, clip)
    lo = min(u.min(), o.min())
    hi = max(u.max(), o.max())
    if lo == hi:
        return 0.0
    pc, _ = np.histogram(u, bins=bins, range=(lo, hi))
    qc, _ = np.histogram(o, bins=bins, range=(lo, hi))
    p = np.maximum(pc / len(u), floor)
    q = np.maximum(qc / len(o), floor)
    p = p / p.sum()
    q = q / q.sum()
    return float(max(np.sum(p * np.log(p / q)), 0.0))


def klom_summary(scores: np.ndarray) -> dict[str, float]:
    """P95, P99 and mean of per-point KLoM scores.

    scores: (T,) with T >= 1. Returns {"p95", "p99", "mean"} as floats (np.percentile, linear).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array; got shape {s.shape}")
    return {
        "p95": float(np.percentile(s, 95)),
        "p99": float(np.percentile(s, 99)),
        "mean": float(s.mean()),
    }


def _split_index(name: str, split: Split, t: int) -> np.ndarray:
    """Turn a bool mask (T,) or an integer index array into an index array over T points."""
    s = np.asarray(split)
    if s.dtype == bool:
        if s.shape != (t,):
            raise ValueError(f"split {name!r}: bool mask must have shape ({t},); got {s.shape}")
        idx = np.flatnonzero(s)
    elif np.issubdtype(s.dtype, np.integer) or s.size == 0:
        if s.ndim != 1:
            raise ValueError(f"split {name!r}: index array must be 1-D; got shape {s.shape}")
        idx = s.astype(np.intp)
        if idx.size and (idx.min() < 0 or idx.max() >= t):
            raise ValueError(
                f"split {name!r}: indices must lie in [0, {t}); got {idx.min()}..{idx.max()}"
            )
    else:
        raise ValueError(
            f"split {name!r}: expected a bool mask or integer indices; got dtype {s.dtype}"
        )
    if idx.size == 0:
        raise ValueError(f"split {name!r} selects no points")
    return idx


def summarize_splits(
    scores: np.ndarray, splits: Mapping[str, Split]
) -> dict[str, dict[str, float]]:
    """Per-split :func:`klom_summary`. scores: (T,); splits: name -> bool mask (T,) or indices."""
    s = np.asarray(scores, dtype=np.float64)
    return {
        name: klom_summary(s[_split_index(name, sp, s.shape[0])]) for name, sp in splits.items()
    }


def klom_report(
    unlearned_margins: np.ndarray,
    oracle_margins: np.ndarray,
    splits: Mapping[str, Split],
    *,
    bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    binning: str = "unlearnflow",
) -> dict[str, dict[str, float]]:
    """KLoM summaries per split, e.g. {"forget": {"p95", "p99", "mean"}, "retain": ..., ...}.

    unlearned_margins: (N_u, T); oracle_margins: (N_o, T); splits: name -> bool mask (T,) or
    integer indices into T. Report :func:`noise_floor` beside these figures.
    """
    scores = klom_scores(
        unlearned_margins, oracle_margins, bins=bins, clip=clip, floor=floor, binning=binning
    )
    return summarize_splits(scores, splits)


def oracle_halves(n_oracles: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of range(n_oracles), each of size n_oracles // 2.

    Seeded permutation (np.random.default_rng(seed)); with an odd count one oracle is left out
    so both samples have the same size, as unlearned and oracle samples do in the benchmark.
    """
    if n_oracles < 4:
        raise ValueError(f"the noise floor needs at least 4 oracles; got {n_oracles}")
    perm = np.random.default_rng(seed).permutation(n_oracles)
    half = n_oracles // 2
    return np.sort(perm[:half]), np.sort(perm[half : 2 * half])


def noise_floor(
    oracle_margins: np.ndarray,
    splits: Mapping[str, Split],
    seed: int = 0,
    *,
    bins: int = 20,
    clip: float = 100.0,
    floor: float = 1e-5,
    binning: str = "unlearnflow",
) -> dict[str, dict[str, float]]:
    """Oracle-vs-oracle KLoM summaries per split: the value a perfect unlearner would score.

    oracle_margins: (N_o, T) with N_o >= 4. The oracles are split into two disjoint seeded
    halves (:func:`oracle_halves`) and KLoM of the first against the second is summarised per
    split. Each half has N_o // 2 models, so this is the floor at half the sample size.
    """
    o = _check_margins("oracle_margins", oracle_margins, min_models=4)
    a, b = oracle_halves(o.shape[0], seed)
    return klom_report(o[a], o[b], splits, bins=bins, clip=clip, floor=floor, binning=binning)
