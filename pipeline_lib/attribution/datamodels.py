"""Linear datamodels from subset-model masks and outputs, without materialising β
(algorithms.md §2; Ilyas et al., "Datamodels", ICML 2022; Georgiev et al., "Attribute-to-Delete:
Machine Unlearning via Datamodel Matching", ICLR 2025, arXiv 2410.23232).

Setting: M models, model j trained on a random subset S_j of the N training points,
|S_j| ≈ αN. ``masks`` X ∈ {0,1}^{M×N} (X_ji = 1 iff i ∈ S_j); ``outputs`` Y of shape (M, T)
(one scalar per target, e.g. the correct-class margin, see :func:`margins`) or (M, T, C) (all
logits). Below K = T or T·C and Y is viewed as (M, K). The linear datamodel of output k is

    f_k(x; S) ≈ ȳ_k + (1_S − x̄) · β_k,        i.e. β_k · 1_S + b_k with b_k = ȳ_k − x̄ · β_k,

with x̄ = ``centre`` (N,) the column means of X and ȳ = ``bias`` (K,) the mean output. A deletion
request for a forget set F needs only Σ_{i∈F} β_{k,i} (DM-Direct:
f̂(x) = f_θ(x) − Σ_{i∈F} β(x)_i, algorithms.md §2 with m = 1) — never the full (K, N) matrix β,
which for Fashion-MNIST (60k targets × 60k points × 10 classes) would be 288 GB.

Both estimators write β in a *dual* form, β = Dᵀ W with D (M, N) built from the masks alone and
W = ``weights`` (M, K). Then for any F chosen after the fact

    Σ_{i∈F} β_i = (Σ_{i∈F} D[:, i])ᵀ W                                          (M·|F| + M·K)

and predictions for new subsets s (M', N) are ȳ + (s − x̄) Dᵀ W, the (M', M) kernel (s − x̄) Dᵀ
being accumulated over column blocks of N. Masks are kept bit-packed (np.packbits, as in the
attribution store), so a fitted model costs M·N/8 bytes + M·K·8 bytes.

Estimators (``ESTIMATORS``):

``ridge_dual`` (default). Ridge regression with an unpenalised intercept, i.e. exactly
sklearn ``Ridge(alpha=lam, fit_intercept=True)``. With A = X − 1x̄ᵀ (centred design),
the primal solution β = (AᵀA + λI_N)⁻¹ Aᵀ(Y − ȳ) equals, by the push-through identity
(AᵀA + λI_N)⁻¹Aᵀ = Aᵀ(AAᵀ + λI_M)⁻¹,

    β = Aᵀ W,    W = (AAᵀ + λI_M)⁻¹ (Y − ȳ),    so D = A.

Cost: O(M²N) for the kernel AAᵀ (column blocks of ``block``: memory O(M² + M·block), never an
(M, N) float array), O(M³) for the Cholesky factor, O(M²K) for the solve (column blocks of K);
memory O(M² + MN/8 + MK), independent of N×K. When there are more models than points (M > N,
e.g. 16,000 digits subset models on 1,437 points) the factored system is the primal Gram
AᵀA + λI_N instead (:func:`ridge_form`): O(N²M + N³), memory O(N² + block·N), and W follows
from the primal β of each block of outputs as W = (Y − ȳ − Aβ)/λ, which satisfies
(AAᵀ + λI)W = Y − ȳ exactly. Either way W, and every result below, is the same.

Ridge is the default because it is regularised, uses every model jointly (each coefficient is
fitted given the others, so correlated inclusions are accounted for), and is the least-noisy
estimator of the two for a given M.

``diff_means``. β_i = E[f | i ∈ S] − E[f | i ∉ S] estimated by the empirical means. With
n_i = Σ_j X_ji the inclusion count of point i,

    β_i = (1/n_i) Σ_{j: i∈S_j} f_j − (1/(M − n_i)) Σ_{j: i∉S_j} f_j = Σ_j D_ji (f_j − ȳ),
    D_ji = X_ji / n_i − (1 − X_ji) / (M − n_i),

(the ȳ term is exact because Σ_j D_ji = 1 − 1 = 0; subtracting it only helps rounding). Hence
Σ_{i∈F} β_i = Σ_j c_j (f_j − ȳ) with c_j = Σ_{i∈F} D_ji and W = Y − ȳ: fitting costs O(MK),
no kernel. A point never or always included (n_i ∈ {0, M}) has no estimate: its β_i is set to 0
(a warning is logged). For inclusion independent across points (Bernoulli(α)) the estimator is
unbiased for a linear truth; for exactly-αN subsets E[β̂_i] = β_i − Σ_{k≠i} β_k / (N − 1), a
shift shared by all points that cancels in predictions for fixed-size subsets. It is noisier
than ridge (each β_i uses only the marginal contrast, the other points' contributions act as
noise) and ``lam`` is ignored.

Identifiability. When every subset has exactly αN points (the attribution store's draw),
1_S · 1 = αN for every model, so adding a constant κ to every β_i changes no prediction: β
is identified only up to κ·1, and Σ_{i∈F} β_i only up to |F|·κ. Ridge picks the minimum-norm
representative, which has Σ_i β_i = 0 exactly (β = Aᵀ W lies in the row space of A, and
A·1 = 0); diff_means has Σ_i β̂_i ≈ 0 (exactly in expectation: E[β̂_i] = β_i − Σ_{k≠i} β_k/(N−1)).
DM-Direct inherits this convention; say so beside any absolute forget shift that is reported.
DMM's targets can pin κ instead with the trained model, the one model whose subset is all of
D (:func:`pipeline_lib.attribution.matching.full_model_anchor`, ``unlearn.dmm.anchor``).

Reference implementations beside the fast paths (design.md habit 5): :func:`ridge_primal_reference`
(dense primal normal equations), :func:`diff_means_reference` (a loop over points),
:func:`beta_dense` (materialised β) and :func:`lds_reference` (scipy.stats.spearmanr per target).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.special
import scipy.stats
import torch

log = logging.getLogger(__name__)

ESTIMATORS = ("ridge_dual", "diff_means")

_ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"datamodel estimator {estimator!r} unknown; valid: {', '.join(ESTIMATORS)}"
        )


def _check_block(block: int) -> int:
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return int(block)


# --------------------------------------------------------------------------------------------
# margins
# --------------------------------------------------------------------------------------------


def margins(logits: _ArrayLike, labels: Any) -> np.ndarray:
    """Correct-class margin m(x) = z_y − log Σ_{j≠y} exp z_j (algorithms.md, notation).

    logits (..., T, C) (numpy or torch; any leading model axes), labels (T,) ints in [0, C)
    → (..., T) float64. Computed in float64 with a max-shifted log-sum-exp over the other
    classes (the correct class is set to −inf), so logits of size 1e3 neither overflow nor lose
    the margin to cancellation.
    """
    z = _to_numpy(logits).astype(np.float64, copy=True)
    y = _to_numpy(labels)
    if z.ndim < 2:
        raise ValueError(f"logits must have shape (..., T, C), got {z.shape}")
    if y.ndim != 1 or y.shape[0] != z.shape[-2]:
        raise ValueError(
            f"labels shape {y.shape} does not match logits shape {z.shape}: need (T,) = ({z.shape[-2]},)"
        )
    n_classes = z.shape[-1]
    if n_classes < 2:
        raise ValueError(f"margins need at least 2 classes, logits shape {z.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be integers in [0, {n_classes}), got {y.dtype} {y!r}")
    y = y.astype(np.intp)
    rows = np.arange(y.shape[0])
    correct = z[..., rows, y]
    z[..., rows, y] = -np.inf
    return correct - scipy.special.logsumexp(z, axis=-1)


# --------------------------------------------------------------------------------------------
# the fitted datamodels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Datamodels:
    """Fitted linear datamodels in dual form, β = Dᵀ W (see the module docstring).

    - ``estimator``: "ridge_dual" or "diff_means".
    - ``alpha``: empirical mean mask density Σ X / (M·N).
    - ``lam``: ridge penalty λ (ignored by diff_means, stored as given).
    - ``centre``: (N,) float64 column means x̄ of the fitting masks (n_i / M).
    - ``train_masks``: (M, ceil(N/8)) uint8, the fitting masks bit-packed along N with
      ``np.packbits(masks, axis=1)`` (the attribution store's layout); the kernels of
      predictions are taken against them. :meth:`masks_bool` unpacks them.
    - ``weights``: (M, T) or (M, T, C) float64 dual coefficients W.
    - ``bias``: (T,) or (T, C) float64 mean output ȳ.

    All arrays are read-only. Build with :func:`fit_datamodels`.
    """

    estimator: str
    alpha: float
    lam: float
    centre: np.ndarray
    train_masks: np.ndarray
    weights: np.ndarray
    bias: np.ndarray

    @property
    def n_models(self) -> int:
        """M, the number of fitting models."""
        return int(self.weights.shape[0])

    @property
    def n_train(self) -> int:
        """N, the number of training points."""
        return int(self.centre.shape[0])

    @property
    def output_shape(self) -> tuple[int, ...]:
        """(T,) or (T, C)."""
        return tuple(self.bias.shape)

    def masks_bool(self) -> np.ndarray:
        """(M, N) bool fitting masks (unpacked; O(M·N) bytes)."""
        return np.unpackbits(self.train_masks, axis=1, count=self.n_train).astype(bool)


def _check_masks(masks: Any, name: str = "masks") -> np.ndarray:
    """(M, N) bool from a bool or 0/1 numeric array."""
    m = _to_numpy(masks)
    if m.ndim != 2:
        raise ValueError(f"{name} must have shape (M, N), got {m.shape}")
    if m.dtype != np.bool_:
        if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
            raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {m.dtype}")
        if np.any((m != 0) & (m != 1)):
            raise ValueError(f"{name} must hold only 0/1 values")
        m = m != 0
    return m


def _gather_bits(packed: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(M, len(idx)) bool: columns ``idx`` of masks packed big-endian along axis 1."""
    shift = (7 - (idx & 7)).astype(np.uint8)
    return ((packed[:, idx >> 3] >> shift) & 1).astype(bool)


def _design_cols(estimator: str, bits: np.ndarray, centre: np.ndarray, n_models: int) -> np.ndarray:
    """Columns of the dual design D (M, k) float64 for mask columns ``bits`` (M, k) whose
    column means are ``centre`` (k,). ridge: D = X − x̄; diff_means: D = X/n − (1−X)/(M−n)."""
    if estimator == "ridge_dual":
        return bits - centre
    counts = np.rint(centre * n_models)
    pos = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    neg = np.divide(1.0, n_models - counts, out=np.zeros_like(counts), where=counts < n_models)
    ok = (counts > 0) & (counts < n_models)
    # a point with n_i ∈ {0, M} has no contrast: β_i = 0
    return np.where(bits, np.where(ok, pos, 0.0), np.where(ok, -neg, 0.0))


def _design_block(dm: Datamodels, idx: np.ndarray) -> np.ndarray:
    return _design_cols(
        dm.estimator, _gather_bits(dm.train_masks, idx), dm.centre[idx], dm.n_models
    )


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def ridge_form(n_models: int, n_train: int) -> str:
    """Which ridge system the fast paths factor: "dual" (AAᵀ + λI_M) when M ≤ N, "primal"
    (AᵀA + λI_N) when M > N — always the smaller of the two (module docstring)."""
    return "primal" if n_models > n_train else "dual"


def _dgemm_acc(c: np.ndarray, a: np.ndarray, b: np.ndarray, trans_b: bool = False) -> np.ndarray:
    """c += a @ b (or a @ bᵀ) through scipy's BLAS, in place when c is Fortran-ordered."""
    return scipy.linalg.blas.dgemm(1.0, a, b, beta=1.0, c=c, trans_b=int(trans_b), overwrite_c=1)


_PANEL = 2048  # columns of the dual kernel per dgemm call

#: Ridge systems larger than this are built and factored with one BLAS thread. The OpenBLAS
#: 0.3.31 bundled with numpy 2.4 / scipy 1.17 segfaults, multi-threaded, in dsyrk and in the
#: Cholesky factor (dpotrf) of a 16,000 × 16,000 matrix on this machine's Skylake-X kernels;
#: single-threaded it runs (20.7 s for the factor). 8,000 runs multi-threaded (measured).
BLAS_ONE_THREAD_ABOVE = 8192


def _blas_guard(size: int) -> Any:
    """One BLAS thread while handling a ridge system of ``size`` > BLAS_ONE_THREAD_ABOVE."""
    if size <= BLAS_ONE_THREAD_ABOVE:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    log.info("ridge system of %d: one BLAS thread (OpenBLAS crashes multi-threaded)", size)
    return threadpool_limits(limits=1, user_api="blas")


def _ridge_cholesky(
    X: np.ndarray, centre: np.ndarray, lam: float, block: int, form: str | None = None
) -> Any:
    """Cholesky factor (scipy ``cho_factor`` form, lower) of the smaller ridge system of the
    masks X (M, N), A = X − x̄ (``form``: :func:`ridge_form` unless given):

    - dual, AAᵀ + λI_M: accumulated over ``block`` columns of N; within a block, the lower
      triangle in panels of columns, K[c:, c:c'] += A[c:] A[c:c']ᵀ;
    - primal, AᵀA + λI_N: accumulated over ``block`` rows of M.

    Both use general matrix products (dgemm), not dsyrk: the OpenBLAS bundled with scipy
    1.17.1 segfaults in dsyrk for a 16,000 × 16,000 kernel of 1,024 or more columns (M = 16,000
    digits subset models crashed the process); dgemm on the same sizes runs. Its multi-threaded
    Cholesky crashes at that size too, hence one BLAS thread past ``BLAS_ONE_THREAD_ABOVE``."""
    n_models, n_train = X.shape
    form = ridge_form(n_models, n_train) if form is None else form
    with _blas_guard(n_train if form == "primal" else n_models):
        if form == "primal":
            K = np.zeros((n_train, n_train), dtype=np.float64, order="F")
            for r in range(0, n_models, block):
                At = (X[r : r + block] - centre).T  # (N, b), a Fortran-ordered view: no copy
                K = _dgemm_acc(K, At, At, trans_b=True)
                del At
        else:
            K = np.zeros((n_models, n_models), dtype=np.float64, order="F")
            for s in range(0, n_train, block):
                At = (X[:, s : s + block] - centre[s : s + block]).T  # (b, M), Fortran-ordered
                for c in range(0, n_models, _PANEL):
                    e = min(c + _PANEL, n_models)
                    K[c:, c:e] = scipy.linalg.blas.dgemm(
                        1.0, At[:, c:], At[:, c:e], beta=1.0, c=K[c:, c:e], trans_a=1
                    )
                del At
        K[np.diag_indices_from(K)] += lam
        return scipy.linalg.cho_factor(K, lower=True, overwrite_a=True, check_finite=False)


def _apply_centred(X: np.ndarray, centre: np.ndarray, v: np.ndarray, block: int) -> np.ndarray:
    """A v = (X − x̄) v for v (N,) or (N, k), over ``block`` rows of M → (M,) or (M, k),
    through scipy's BLAS (see fit_datamodels on the two OpenBLAS copies)."""
    v2 = np.asfortranarray(v.reshape(v.shape[0], -1), dtype=np.float64)
    out = np.empty((X.shape[0], v2.shape[1]), dtype=np.float64)
    for r in range(0, X.shape[0], block):
        Xt = X[r : r + block].astype(np.float64).T  # (N, b) Fortran-ordered
        out[r : r + block] = scipy.linalg.blas.dgemm(1.0, Xt, v2, trans_a=1)
    out -= centre @ v2
    return out.reshape((X.shape[0], *v.shape[1:]))


def fit_datamodels(
    masks: _ArrayLike,
    outputs: _ArrayLike,
    lam: float = 1.0,
    estimator: str = "ridge_dual",
    block: int = 4096,
) -> Datamodels:
    """Fit linear datamodels f(x; S) ≈ β(x)·1_S + b(x) for every target (and class).

    masks (M, N) bool (or 0/1), outputs (M, T) or (M, T, C) (any float dtype; float64 inside).
    ``estimator``: "ridge_dual" (default; W = (AAᵀ + λI)⁻¹(Y − ȳ), A = X − x̄, Cholesky in
    float64) or "diff_means" (W = Y − ȳ, D_ji = X_ji/n_i − (1−X_ji)/(M−n_i)); formulas in the
    module docstring. ``lam`` > 0 is the ridge penalty λ. ``block`` bounds the working set:
    the kernel AAᵀ is accumulated over ``block`` columns of N at a time and the solve runs over
    ``block`` output columns at a time, so no (M, N) float array is ever formed.
    """
    _check_estimator(estimator)
    block = _check_block(block)
    X = _check_masks(masks)
    Y = _to_numpy(outputs)
    if Y.ndim not in (2, 3):
        raise ValueError(f"outputs must have shape (M, T) or (M, T, C), got {Y.shape}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"masks shape {X.shape} and outputs shape {Y.shape} disagree on the number of models M"
        )
    if not np.issubdtype(Y.dtype, np.number) or np.iscomplexobj(Y):
        raise ValueError(f"outputs must be real numbers, got dtype {Y.dtype}")
    n_models, n_train = X.shape
    if n_models < 2 or n_train < 1:
        raise ValueError(f"need at least 2 models and 1 training point, masks shape {X.shape}")
    if estimator == "ridge_dual" and not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"ridge_dual needs lam > 0, got {lam}")
    t0 = time.perf_counter()

    out_shape = Y.shape[1:]
    Y2 = Y.reshape(n_models, -1)
    n_out = Y2.shape[1]
    counts = np.count_nonzero(X, axis=0)
    centre = counts / n_models
    alpha = float(counts.sum()) / (n_models * n_train)
    degenerate = int(np.count_nonzero((counts == 0) | (counts == n_models)))
    if degenerate:
        log.warning(
            "%d of %d training points are in no model or in every model: their β is %s",
            degenerate,
            n_train,
            "0 (diff_means)" if estimator == "diff_means" else "shrunk to 0 by the ridge",
        )
    bias = Y2.mean(axis=0, dtype=np.float64)
    if not np.all(np.isfinite(bias)):
        raise ValueError("outputs contain non-finite values")

    W = np.empty((n_models, n_out), dtype=np.float64)
    if estimator == "ridge_dual":
        # Kernel, Cholesky and solve all go through scipy's BLAS: numpy and scipy wheels bundle
        # separate OpenBLAS copies, and alternating between their thread pools on a busy
        # 2-core machine made the Cholesky up to 50x slower (spinning idle workers).
        chol = _ridge_cholesky(X, centre, lam, block)
        primal = ridge_form(n_models, n_train) == "primal"
        with _blas_guard(chol[0].shape[0]):
            for s in range(0, n_out, block):
                # Fortran order lets LAPACK potrs solve in place (no copy of the right-hand side)
                rhs = Y2[:, s : s + block].astype(np.float64, order="F")
                rhs -= bias[s : s + block]
                if primal:
                    # β = (AᵀA + λI)⁻¹Aᵀ(Y − ȳ), then W = (Y − ȳ − Aβ)/λ: the push-through
                    # identity gives (AAᵀ + λI)W = Y − ȳ exactly, so W is the dual solution
                    AtR = np.zeros((n_train, rhs.shape[1]), dtype=np.float64, order="F")
                    for r in range(0, n_models, block):
                        AtR = _dgemm_acc(AtR, (X[r : r + block] - centre).T, rhs[r : r + block])
                    beta = scipy.linalg.cho_solve(chol, AtR, overwrite_b=True, check_finite=False)
                    W[:, s : s + block] = (rhs - _apply_centred(X, centre, beta, block)) / lam
                else:
                    W[:, s : s + block] = scipy.linalg.cho_solve(
                        chol, rhs, overwrite_b=True, check_finite=False
                    )
        del chol
    else:
        for s in range(0, n_out, block):
            W[:, s : s + block] = Y2[:, s : s + block] - bias[s : s + block]
    if not np.all(np.isfinite(W)):
        raise ValueError("outputs contain non-finite values")

    dm = Datamodels(
        estimator=estimator,
        alpha=alpha,
        lam=float(lam),
        centre=_readonly(centre),
        train_masks=_readonly(np.packbits(X, axis=1)),
        weights=_readonly(W.reshape((n_models, *out_shape))),
        bias=_readonly(bias.reshape(out_shape)),
    )
    log.info(
        "fitted %s datamodels: M=%d N=%d outputs=%s in %.2fs",
        estimator,
        n_models,
        n_train,
        out_shape,
        time.perf_counter() - t0,
    )
    return dm


# --------------------------------------------------------------------------------------------
# using them
# --------------------------------------------------------------------------------------------


def _check_forget(forget_idx: Any, n_train: int) -> np.ndarray:
    """(|F|,) intp indices from an index array or an (N,) bool mask; a *set*: no duplicates."""
    f = _to_numpy(forget_idx)
    if f.dtype == np.bool_:
        if f.shape != (n_train,):
            raise ValueError(f"a bool forget mask must have shape ({n_train},), got {f.shape}")
        return np.flatnonzero(f)
    f = f.reshape(-1) if f.ndim == 0 else f
    if f.ndim != 1:
        raise ValueError(f"forget_idx must be 1-D, got shape {f.shape}")
    if f.size == 0:
        return np.zeros(0, dtype=np.intp)
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"forget_idx must be integers, got dtype {f.dtype}")
    lo, hi = int(f.min()), int(f.max())
    if lo < 0 or hi >= n_train:
        raise ValueError(f"forget_idx out of range [0, {n_train}): min {lo}, max {hi}")
    f = f.astype(np.intp)
    if np.unique(f).size != f.size:
        raise ValueError("forget_idx holds duplicate indices; a forget set lists each point once")
    return f


def forget_shift(dm: Datamodels, forget_idx: Any, block: int = 4096) -> np.ndarray:
    """Predicted output shift Σ_{i∈F} β_i(x) for every target: (T,) or (T, C) float64.

    forget_idx: (|F|,) distinct ints in [0, N) or an (N,) bool mask. Computed as
    uᵀW with u = Σ_{i∈F} D[:, i] (M,), gathering ``block`` forget columns of the packed masks
    at a time: O(M·|F| + M·K) time, O(M·block + K) memory.
    """
    f = _check_forget(forget_idx, dm.n_train)
    block = _check_block(block)
    u = np.zeros(dm.n_models, dtype=np.float64)
    for s in range(0, f.size, block):
        u += _design_block(dm, f[s : s + block]).sum(axis=1)
    return (u @ dm.weights.reshape(dm.n_models, -1)).reshape(dm.output_shape)


def ridge_factor(
    masks: _ArrayLike, lam: float = 1.0, block: int = 4096, form: str | None = None
) -> np.ndarray:
    """Lower Cholesky factor L of the ridge system of ``masks`` that the fast paths solve: the
    dual kernel AAᵀ + λI_M, (M, M), when M ≤ N; the primal Gram AᵀA + λI_N, (N, N), when M > N
    (:func:`ridge_form`). ``form`` ("dual" or "primal") forces one of the two, for comparing
    them (benchmarks/ridge_forms.py); :func:`forget_shift_direct` tells them apart by shape, so
    a forced primal factor needs M ≠ N.

    It depends on the masks only, not on any request or output: compute it once per store
    (O(min(M, N)²·max(M, N) + min(M, N)³)) and pass it to :func:`forget_shift_direct`, whose
    per-request cost then is O(M·|F| + M² + M·T·C) (dual) or O(M·N + N² + M·T·C) (primal)."""
    X = _check_masks(masks)
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"ridge_dual needs lam > 0, got {lam}")
    if form not in (None, "dual", "primal"):
        raise ValueError(f"ridge factor form must be 'dual' or 'primal', got {form!r}")
    if form == "primal" and X.shape[0] == X.shape[1]:
        raise ValueError("a primal factor needs M != N (at M = N its shape is the dual's)")
    centre = np.count_nonzero(X, axis=0) / X.shape[0]
    c, _ = _ridge_cholesky(X, centre, lam, _check_block(block), form)
    return np.tril(c)


def forget_shift_direct(
    masks: _ArrayLike,
    outputs: _ArrayLike,
    forget_idx: Any,
    lam: float = 1.0,
    estimator: str = "ridge_dual",
    block: int = 4096,
    factor: np.ndarray | None = None,
    weights: Any = None,
) -> np.ndarray:
    """Σ_{i∈F} β_i(x) for every target straight from masks and outputs, without fitting W.

    Equal to ``forget_shift(fit_datamodels(masks, outputs, lam, estimator), forget_idx)``
    (tested), because Σ_F β = uᵀW with u = Σ_{i∈F} D[:, i] and W = (AAᵀ + λI)⁻¹(Y − ȳ), so
    Σ_F β = vᵀ(Y − ȳ) with v = (AAᵀ + λI)⁻¹u: one right-hand side instead of T·C. When M > N
    the same v is A(AᵀA + λI)⁻¹e, e the forget indicator (:func:`ridge_form`). For
    diff_means W = Y − ȳ and the shift is uᵀ(Y − ȳ). O(min(M, N)²·max(M, N) + min(M, N)³ +
    M·T·C) time; this is what a deletion request needs (DMM targets), the full fit is for LDS
    and inspection.
    ``factor``: :func:`ridge_factor` of the same masks and λ, precomputed (ridge only).
    ``weights``: (|F|,) w_i for the weighted sum Σ_{i∈F} w_i β_i (u = Σ w_i D[:, i]).
    """
    _check_estimator(estimator)
    block = _check_block(block)
    X = _check_masks(masks)
    Y = _to_numpy(outputs)
    if Y.ndim not in (2, 3) or Y.shape[0] != X.shape[0]:
        raise ValueError(
            f"outputs must have shape (M, T) or (M, T, C) with M = {X.shape[0]}; got {Y.shape}"
        )
    n_models, n_train = X.shape
    f = _check_forget(forget_idx, n_train)
    if estimator == "ridge_dual" and not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"ridge_dual needs lam > 0, got {lam}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w is not None and w.shape != f.shape:
        raise ValueError(f"weights must have one entry per forget point ({f.size}), got {w.shape}")
    counts = np.count_nonzero(X, axis=0)
    centre = counts / n_models
    form = ridge_form(n_models, n_train) if estimator == "ridge_dual" else "dual"
    chol = None
    if estimator == "ridge_dual":
        if factor is None:
            chol = _ridge_cholesky(X, centre, lam, block)
        else:
            # the factor's shape says which system it is: (M, M) dual, (N, N) primal
            if factor.shape == (n_models, n_models):
                form = "dual"
            elif factor.shape == (n_train, n_train):
                form = "primal"
            else:
                raise ValueError(
                    f"factor shape {factor.shape} fits neither ridge system of M = {n_models} "
                    f"models and N = {n_train} points: need ({n_models}, {n_models}) (dual) or "
                    f"({n_train}, {n_train}) (primal)"
                )
            chol = (factor, True)
    if form == "primal":
        # u = A(AᵀA + λI)⁻¹e with e = Σ_{i∈F} w_i 1_i, equal to (AAᵀ + λI)⁻¹Ae (push-through)
        e = np.zeros(n_train, dtype=np.float64)
        e[f] = 1.0 if w is None else w
        with _blas_guard(n_train):
            v = scipy.linalg.cho_solve(chol, e, check_finite=False)
        u = _apply_centred(X, centre, v, block)
    else:
        u = np.zeros(n_models, dtype=np.float64)
        for s in range(0, f.size, block):
            idx = f[s : s + block]
            cols = _design_cols(estimator, X[:, idx], centre[idx], n_models)
            u += cols.sum(axis=1) if w is None else cols @ w[s : s + block]
        if chol is not None:
            with _blas_guard(n_models):
                u = scipy.linalg.cho_solve(chol, u, check_finite=False)
    # uᵀ(Y − ȳ) = uᵀY − (Σu)·ȳ, in float32 for float16/float32 store outputs (no centred
    # copy of the (M, T·C) outputs), float64 for float64 outputs
    Y2 = Y.reshape(n_models, -1)
    dtype = np.float64 if Y2.dtype == np.float64 else np.float32
    Y2 = Y2.astype(dtype, copy=False)
    shift = (u.astype(dtype) @ Y2).astype(np.float64) - u.sum() * Y2.mean(axis=0, dtype=np.float64)
    if not np.all(np.isfinite(shift)):
        raise ValueError("outputs contain non-finite values")
    return shift.reshape(Y.shape[1:])


def predict(dm: Datamodels, masks_new: _ArrayLike, block: int = 4096) -> np.ndarray:
    """Predicted outputs ȳ + (s − x̄)·β for new subsets: masks_new (M', N) → (M', T[, C]).

    The (M', M) kernel G = (s − x̄) Dᵀ is accumulated over ``block`` columns of N, then
    prediction = ȳ + G W: O(M'MN + M'MK) time, O((M' + M)·block + M'M + M'K) memory.
    """
    S = _check_masks(masks_new, "masks_new")
    block = _check_block(block)
    if S.shape[1] != dm.n_train:
        raise ValueError(
            f"masks_new shape {S.shape} does not match the fitted masks shape ({dm.n_models}, {dm.n_train}): N differs"
        )
    G = np.zeros((S.shape[0], dm.n_models), dtype=np.float64)
    for s in range(0, dm.n_train, block):
        idx = np.arange(s, min(s + block, dm.n_train))
        G += (S[:, s : s + block] - dm.centre[idx]) @ _design_block(dm, idx).T
    pred = G @ dm.weights.reshape(dm.n_models, -1) + dm.bias.reshape(-1)
    return pred.reshape((S.shape[0], *dm.output_shape))


def dm_direct(outputs_full: _ArrayLike, dm: Datamodels, forget_idx: Any) -> np.ndarray:
    """DM-Direct (algorithms.md §2, m = 1): f̂(x) = f_θ(x) − Σ_{i∈F} β_i(x).

    outputs_full: (T,) or (T, C), the full model's outputs on the same targets (and in the same
    units — margins or logits — as the fitting outputs) → same shape, float64.
    """
    full = _to_numpy(outputs_full).astype(np.float64)
    if full.shape != dm.output_shape:
        raise ValueError(
            f"outputs_full shape {full.shape} does not match the datamodels' output shape {dm.output_shape}"
        )
    return full - forget_shift(dm, forget_idx)


def beta_dense(dm: Datamodels) -> np.ndarray:
    """Materialised β = (DᵀW)ᵀ: (T, N) or (T, C, N) float64. Tests and small problems only:
    O(K·N) memory, exactly what the rest of this module avoids."""
    D = _design_block(dm, np.arange(dm.n_train))
    beta = D.T @ dm.weights.reshape(dm.n_models, -1)  # (N, K)
    return np.ascontiguousarray(beta.T).reshape((*dm.output_shape, dm.n_train))


# --------------------------------------------------------------------------------------------
# LDS
# --------------------------------------------------------------------------------------------


def _spearman_columns(a: np.ndarray, b: np.ndarray, block: int = 4096) -> np.ndarray:
    """Spearman correlation of each column of a and b (M', K) → (K,); NaN where a column is
    constant (no ranking). Ranks with ties averaged, then Pearson of ranks (as spearmanr)."""
    r = np.empty(a.shape[1], dtype=np.float64)
    for s in range(0, a.shape[1], block):
        ra = scipy.stats.rankdata(a[:, s : s + block], axis=0)
        rb = scipy.stats.rankdata(b[:, s : s + block], axis=0)
        ra -= ra.mean(axis=0)
        rb -= rb.mean(axis=0)
        num = (ra * rb).sum(axis=0)
        den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            r[s : s + block] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return r


def _check_heldout(dm: Datamodels, heldout_masks: Any, heldout_outputs: Any) -> np.ndarray:
    Y = _to_numpy(heldout_outputs)
    M = _to_numpy(heldout_masks)
    if Y.ndim < 1 or M.ndim != 2 or Y.shape[0] != M.shape[0]:
        raise ValueError(
            f"heldout_masks shape {M.shape} and heldout_outputs shape {Y.shape} disagree on the number of models"
        )
    if Y.shape[1:] != dm.output_shape:
        raise ValueError(
            f"heldout_outputs shape {Y.shape} does not match the datamodels' output shape {dm.output_shape}"
        )
    if Y.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 held-out models, got {Y.shape[0]}")
    return Y.astype(np.float64)


def lds_scores(
    dm: Datamodels, heldout_masks: _ArrayLike, heldout_outputs: _ArrayLike
) -> np.ndarray:
    """Per-output LDS (evaluation.md, "Data attribution quality: LDS"): for each target (and
    class), the Spearman correlation across the M' held-out models between the true output
    f(x; S_j) and the prediction ȳ + (1_{S_j} − x̄)·β(x) (ranks are shift-invariant, so this is
    the same as Σ_{i∈S_j} β(x)_i + b(x)).

    heldout_masks (M', N), heldout_outputs (M', T[, C]) → (T[, C]); NaN where the true or the
    predicted output is constant across the held-out models.
    """
    Y = _check_heldout(dm, heldout_masks, heldout_outputs)
    pred = predict(dm, heldout_masks)
    n = Y.shape[0]
    return _spearman_columns(Y.reshape(n, -1), pred.reshape(n, -1)).reshape(dm.output_shape)


def lds(dm: Datamodels, heldout_masks: _ArrayLike, heldout_outputs: _ArrayLike) -> float:
    """Linear datamodeling score: the mean of :func:`lds_scores` over outputs (NaN ones skipped,
    with a warning; NaN if all are).

    For (M', T) outputs this is the standard LDS (evaluation.md). For (M', T, C) logit outputs
    each (target, class) pair is its own linear datamodel and the score is the mean over all
    T·C pairs — *not* comparable to the published anchors, which are on margins: margins are
    not linear in logits, so for a comparable figure fit a separate datamodel on
    ``margins(outputs, labels)`` (M, T) and score that.
    """
    r = lds_scores(dm, heldout_masks, heldout_outputs)
    bad = int(np.count_nonzero(np.isnan(r)))
    if bad == r.size:
        log.warning("LDS undefined: every output is constant across the held-out models")
        return float("nan")
    if bad:
        log.warning("LDS: %d of %d outputs constant across held-out models, skipped", bad, r.size)
    return float(np.nanmean(r))


# --------------------------------------------------------------------------------------------
# slow, obviously-correct references (design.md habit 5)
# --------------------------------------------------------------------------------------------


def ridge_primal_reference(
    masks: np.ndarray, outputs: np.ndarray, lam: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Dense primal ridge: β = (AᵀA + λI_N)⁻¹ Aᵀ (Y − ȳ), A = X − x̄; intercept b = ȳ − x̄·β.

    masks (M, N), outputs (M, T[, C]) → (β (T[, C], N), b (T[, C])). O(N³ + N·K) memory; small
    problems only.
    """
    X = np.asarray(masks, dtype=np.float64)
    Y = np.asarray(outputs, dtype=np.float64)
    Y2 = Y.reshape(Y.shape[0], -1)
    xbar, ybar = X.mean(axis=0), Y2.mean(axis=0)
    A = X - xbar
    beta = np.linalg.solve(A.T @ A + lam * np.eye(X.shape[1]), A.T @ (Y2 - ybar))  # (N, K)
    intercept = ybar - xbar @ beta
    return beta.T.reshape((*Y.shape[1:], X.shape[1])), intercept.reshape(Y.shape[1:])


def diff_means_reference(masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """β_i = mean of outputs over models containing i − mean over models not containing i, by a
    loop over points (0 where either group is empty). masks (M, N), outputs (M, T[, C]) →
    (T[, C], N)."""
    X = np.asarray(masks, dtype=bool)
    Y = np.asarray(outputs, dtype=np.float64)
    beta = np.zeros((*Y.shape[1:], X.shape[1]))
    for i in range(X.shape[1]):
        inside, outside = Y[X[:, i]], Y[~X[:, i]]
        if len(inside) and len(outside):
            beta[..., i] = inside.mean(axis=0) - outside.mean(axis=0)
    return beta


def lds_reference(
    beta: np.ndarray, intercept: np.ndarray, heldout_masks: np.ndarray, heldout_outputs: np.ndarray
) -> float:
    """LDS from a dense β (T[, C], N) and intercept b (T[, C]): a loop of scipy.stats.spearmanr
    over outputs, mean of the defined ones."""
    X = np.asarray(heldout_masks, dtype=np.float64)
    Y = np.asarray(heldout_outputs, dtype=np.float64)
    n_out = int(np.prod(Y.shape[1:]))
    B = beta.reshape(n_out, -1)
    pred = X @ B.T + intercept.reshape(-1)  # (M', K)
    Y2 = Y.reshape(Y.shape[0], -1)
    scores = []
    for k in range(n_out):
        if np.ptp(Y2[:, k]) == 0 or np.ptp(pred[:, k]) == 0:
            continue
        scores.append(scipy.stats.spearmanr(Y2[:, k], pred[:, k]).statistic)
    return float(np.mean(scores)) if scores else float("nan")
