"""Linear datamodels: dual fast paths against dense references, recovery of a planted linear
truth, LDS, memory of the blocked fit, and input errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from pipeline_lib.attribution import datamodels
from pipeline_lib.attribution.datamodels import (
    ESTIMATORS,
    Datamodels,
    beta_dense,
    diff_means_reference,
    dm_direct,
    fit_datamodels,
    forget_shift,
    lds,
    lds_reference,
    lds_scores,
    margins,
    predict,
    ridge_form,
    ridge_primal_reference,
)

# float64 throughout; dual and primal agree to ~1e-13 here, 1e-8 is the required bound
TOL = {"atol": 1e-8, "rtol": 0}


def _subset_masks(rng: np.random.Generator, m: int, n: int, alpha: float) -> np.ndarray:
    """(m, n) bool, each row exactly round(alpha·n) points (as the attribution store draws)."""
    k = int(round(alpha * n))
    order = np.argsort(rng.random((m, n)), axis=1)
    masks = np.zeros((m, n), dtype=bool)
    np.put_along_axis(masks, order[:, :k], True, axis=1)
    return masks


def _small(seed: int = 0, classes: bool = True, m: int = 40):
    """m models on 25 points: m > 25 takes the primal ridge system, m <= 25 the dual."""
    rng = np.random.default_rng(seed)
    masks = _subset_masks(rng, m, 25, 0.5)
    shape = (m, 6, 3) if classes else (m, 6)
    outputs = rng.normal(size=shape) + 0.3 * (
        masks @ rng.normal(size=(25, int(np.prod(shape[1:]))))
    ).reshape(shape)
    return masks, outputs


# ------------------------------------------------------------------------------------ margins


def test_margins_hand_computed():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    labels = np.array([0, 1, 2])
    want = np.array([2 - np.log(np.e + 1), 3 - np.log(1 + np.e), 1 - np.log(2 * np.e)])
    np.testing.assert_allclose(margins(logits, labels), want, rtol=1e-14)
    # leading model axes and torch input
    stacked = torch.tensor(np.stack([logits, logits + 5.0]), dtype=torch.float32)
    got = margins(stacked, torch.tensor(labels))
    assert got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, np.stack([want, want]), rtol=1e-6)


def test_margins_stable_for_large_logits():
    logits = np.array([[1000.0, 999.0, -1000.0], [1000.0, 999.0, -1000.0], [1e3, 1e3, 1e3]])
    got = margins(logits, [0, 2, 1])
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0], 1.0, rtol=1e-14)  # 1000 − (999 + log(1 + e^−1999))
    np.testing.assert_allclose(got[1], -2000.0 - np.log1p(np.exp(-1.0)), rtol=1e-14)
    np.testing.assert_allclose(got[2], -np.log(2.0), rtol=1e-12)


def test_margins_errors():
    with pytest.raises(ValueError, match=r"labels shape \(2,\).*logits shape \(3, 4\)"):
        margins(np.zeros((3, 4)), [0, 1])
    with pytest.raises(ValueError, match="integers in"):
        margins(np.zeros((2, 4)), [0, 4])
    with pytest.raises(ValueError, match="at least 2 classes"):
        margins(np.zeros((2, 1)), [0, 0])


# ------------------------------------------------------------ dual fast path vs dense references


@pytest.mark.parametrize("classes", [False, True], ids=["MT", "MTC"])
@pytest.mark.parametrize("lam", [0.5, 3.0])
@pytest.mark.parametrize("m", [40, 20], ids=["M>N-primal", "M<N-dual"])
def test_ridge_dual_matches_primal(classes, lam, m):
    masks, outputs = _small(classes=classes, m=m)
    assert ridge_form(*masks.shape) == ("primal" if m > 25 else "dual")
    dm = fit_datamodels(masks, outputs, lam=lam)
    assert dm.estimator == "ridge_dual" and dm.weights.shape == outputs.shape
    beta_ref, intercept_ref = ridge_primal_reference(masks, outputs, lam)
    beta = beta_dense(dm)
    assert beta.shape == (*outputs.shape[1:], 25)
    np.testing.assert_allclose(beta, beta_ref, **TOL)

    # the primal reference is itself sklearn's Ridge with an unpenalised intercept
    sk = Ridge(alpha=lam, fit_intercept=True, solver="cholesky").fit(
        masks.astype(float), outputs.reshape(m, -1)
    )
    np.testing.assert_allclose(beta.reshape(-1, 25), sk.coef_, **TOL)
    np.testing.assert_allclose(
        (dm.bias - dm.centre @ np.moveaxis(beta, -1, -2)).reshape(-1), sk.intercept_, **TOL
    )
    np.testing.assert_allclose(dm.bias - beta @ dm.centre, intercept_ref, **TOL)

    forget = np.array([3, 7, 8, 20])
    np.testing.assert_allclose(forget_shift(dm, forget), beta[..., forget].sum(-1), **TOL)
    full = np.random.default_rng(1).normal(size=outputs.shape[1:])
    np.testing.assert_allclose(dm_direct(full, dm, forget), full - beta[..., forget].sum(-1), **TOL)

    new = _subset_masks(np.random.default_rng(2), 7, 25, 0.5)
    want = new.astype(float) @ beta.reshape(-1, 25).T + intercept_ref.reshape(-1)
    np.testing.assert_allclose(predict(dm, new), want.reshape(7, *outputs.shape[1:]), **TOL)
    np.testing.assert_allclose(
        predict(dm, new).reshape(7, -1), sk.predict(new.astype(float)), **TOL
    )


@pytest.mark.parametrize("classes", [False, True], ids=["MT", "MTC"])
def test_diff_means_matches_dense_definition(classes):
    masks, outputs = _small(classes=classes)
    masks[:, 4] = True  # in every model: no contrast, β = 0 by convention
    masks[:, 9] = False  # in no model
    dm = fit_datamodels(masks, outputs, estimator="diff_means")
    beta_ref = diff_means_reference(masks, outputs)
    beta = beta_dense(dm)
    np.testing.assert_allclose(beta, beta_ref, **TOL)
    assert np.all(beta[..., [4, 9]] == 0)

    for forget in (np.array([0, 4, 9, 11, 24]), np.arange(25)):
        np.testing.assert_allclose(forget_shift(dm, forget), beta_ref[..., forget].sum(-1), **TOL)
    # Σ_{i∈F} β_i = Σ_j c_j f_j with c_j = Σ_{i∈F} [X_ji/n_i − (1−X_ji)/(M−n_i)]
    forget = np.array([1, 2, 17])
    n = masks.sum(0)[forget]
    c = (masks[:, forget] / n - (~masks[:, forget]) / (40 - n)).sum(1)
    np.testing.assert_allclose(forget_shift(dm, forget), np.tensordot(c, outputs, 1), **TOL)

    new = _subset_masks(np.random.default_rng(3), 5, 25, 0.5)
    want = dm.bias + np.tensordot(new - dm.centre, np.moveaxis(beta_ref, -1, 0), 1)
    np.testing.assert_allclose(predict(dm, new), want, **TOL)


@pytest.mark.parametrize("m", [40, 20], ids=["primal", "dual"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_results_do_not_depend_on_block(estimator, m, monkeypatch):
    masks, outputs = _small(seed=5, m=m)
    big = fit_datamodels(masks, outputs, estimator=estimator, block=4096)
    # the dual kernel's lower triangle in panels of 3 columns (2,048 by default)
    monkeypatch.setattr(datamodels, "_PANEL", 3)
    tiny = fit_datamodels(masks, outputs, estimator=estimator, block=3)
    np.testing.assert_allclose(tiny.weights, big.weights, atol=1e-12, rtol=0)
    forget = np.arange(0, 25, 2)
    np.testing.assert_allclose(
        forget_shift(tiny, forget, block=2), forget_shift(big, forget), atol=1e-12, rtol=0
    )
    new = _subset_masks(np.random.default_rng(6), 4, 25, 0.5)
    np.testing.assert_allclose(predict(big, new, block=5), predict(big, new), atol=1e-12, rtol=0)


def test_forget_set_forms():
    masks, outputs = _small()
    dm = fit_datamodels(masks, outputs)
    bool_mask = np.zeros(25, dtype=bool)
    bool_mask[[2, 5, 6]] = True
    np.testing.assert_array_equal(forget_shift(dm, bool_mask), forget_shift(dm, [2, 5, 6]))
    np.testing.assert_allclose(
        forget_shift(dm, torch.tensor([6, 2, 5])), forget_shift(dm, [2, 5, 6]), atol=1e-14
    )
    np.testing.assert_array_equal(forget_shift(dm, np.array([], dtype=int)), np.zeros((6, 3)))


def test_fitted_arrays_are_packed_and_read_only():
    masks, outputs = _small()
    dm = fit_datamodels(masks, outputs)
    assert isinstance(dm, Datamodels)
    assert dm.train_masks.shape == (40, 4) and dm.train_masks.dtype == np.uint8
    np.testing.assert_array_equal(dm.masks_bool(), masks)
    assert dm.alpha == pytest.approx(masks.mean())
    with pytest.raises(ValueError):
        dm.weights[0, 0, 0] = 1.0
    masks[:] = False  # the caller's array is not aliased
    assert dm.masks_bool().any()


# ---------------------------------------------------------------------- recovery and LDS


@pytest.fixture(scope="module")
def planted():
    """M=2000 (+200 held out) models, N=100, α=0.5, T=8 targets, sparse β*, noise 0.1."""
    rng = np.random.default_rng(42)
    n, t = 100, 8
    beta_star = rng.normal(size=(t, n)) * (rng.random((t, n)) < 0.1)
    b = rng.normal(size=t)
    masks = _subset_masks(rng, 2200, n, 0.5)
    outputs = masks @ beta_star.T + b + 0.1 * rng.normal(size=(2200, t))
    noise = rng.normal(size=(2200, t))
    return beta_star, masks, outputs, noise


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_recovers_planted_linear_datamodels(planted, estimator):
    beta_star, masks, outputs, _ = planted
    dm = fit_datamodels(masks[:2000], outputs[:2000], estimator=estimator)
    beta = beta_dense(dm)
    corr = [np.corrcoef(beta[k], beta_star[k])[0, 1] for k in range(len(beta))]
    assert min(corr) > 0.95, corr
    score = lds(dm, masks[2000:], outputs[2000:])
    assert score > 0.9
    intercept = dm.bias - beta @ dm.centre
    assert score == pytest.approx(
        lds_reference(beta, intercept, masks[2000:], outputs[2000:]), abs=1e-12
    )
    # Every subset has exactly αN points, so β is identified only up to a constant added to all
    # coordinates; both estimators return (about) the representative with Σ_i β_i = 0.
    centred = beta_star - beta_star.mean(1, keepdims=True)
    forget = np.random.default_rng(0).choice(100, size=10, replace=False)
    if estimator == "ridge_dual":  # residual noise 0.1: SE of the sum ≈ 0.1·sqrt(|F|/(Mα(1−α)))
        atol = 0.1
    else:  # every other point's effect is noise: SE ≈ sd(f)·sqrt(Σ_j c_j²) ≈ sd(f)·sqrt(4|F|/M)
        atol = 4 * np.sqrt(4 * 10 / 2000) * outputs[:2000].std(0)
    err = np.abs(forget_shift(dm, forget) - centred[:, forget].sum(1))
    assert np.all(err < atol), (err, atol)
    if estimator == "ridge_dual":
        np.testing.assert_allclose(beta.sum(1), 0.0, atol=1e-9)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lds_of_pure_noise_is_near_zero(planted, estimator):
    _, masks, _, noise = planted
    dm = fit_datamodels(masks[:2000], noise[:2000], estimator=estimator)
    assert abs(lds(dm, masks[2000:], noise[2000:])) < 0.1


def test_lds_with_class_outputs_averages_over_target_class_pairs():
    masks, outputs = _small(classes=True)
    rng = np.random.default_rng(9)
    held = _subset_masks(rng, 30, 25, 0.5)
    truth = rng.normal(size=(25, 18))
    held_out = (held @ truth + 0.5 * rng.normal(size=(30, 18))).reshape(30, 6, 3)
    dm = fit_datamodels(masks, outputs)
    scores = lds_scores(dm, held, held_out)
    assert scores.shape == (6, 3)
    beta = beta_dense(dm)
    want = lds_reference(beta, dm.bias - beta @ dm.centre, held, held_out)
    assert lds(dm, held, held_out) == pytest.approx(want, abs=1e-12)
    assert np.mean(scores) == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------- memory


def test_fit_memory_is_blocked():
    """M=500, N=60_000, T=50. Reference sizes: the masks as float64 are 240 MB, as bool 30 MB
    (the caller's, allocated before tracing), a dense β would be T·N·8 = 24 MB. The fit holds
    the packed masks (3.75 MB), the (M, M) kernel (2 MB) and one (M, block) float64 block of the
    centred design (M·block·8 bytes). Measured traced peaks of fit + a 8572-point forget_shift:
    9.3 / 13.9 / 23.2 MB at block = 1024 / 2048 / 4096 (default). At block=2048 the bound is
    16 MB: below a dense β and 15x below the unblocked centred design."""
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, size=(500, 60_000), dtype=np.uint8).view(bool)
    outputs = rng.normal(size=(500, 50))
    tracemalloc.start()
    try:
        dm = fit_datamodels(masks, outputs, block=2048)
        shift = forget_shift(dm, np.arange(0, 60_000, 7), block=2048)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shift.shape == (50,) and np.all(np.isfinite(shift))
    assert peak < 16e6 < 50 * 60_000 * 8, peak


# ------------------------------------------------------------------------------- errors


def test_errors():
    masks, outputs = _small()
    with pytest.raises(ValueError, match=r"masks shape \(40, 25\).*outputs shape \(39, 6, 3\)"):
        fit_datamodels(masks, outputs[:39])
    with pytest.raises(ValueError, match="unknown; valid: ridge_dual, diff_means"):
        fit_datamodels(masks, outputs, estimator="lasso")
    with pytest.raises(ValueError, match="lam > 0"):
        fit_datamodels(masks, outputs, lam=0.0)
    with pytest.raises(ValueError, match="0/1"):
        fit_datamodels(masks * 2, outputs)
    bad = outputs.copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_datamodels(masks, bad)

    dm = fit_datamodels(masks, outputs)
    for f in ([0, 25], [-1, 3]):
        with pytest.raises(ValueError, match=r"out of range \[0, 25\)"):
            forget_shift(dm, f)
    with pytest.raises(ValueError, match="duplicate"):
        forget_shift(dm, [1, 1])
    with pytest.raises(ValueError, match=r"shape \(25,\)"):
        forget_shift(dm, np.zeros(24, dtype=bool))
    with pytest.raises(ValueError, match=r"masks_new shape \(3, 24\).*\(40, 25\)"):
        predict(dm, np.zeros((3, 24), dtype=bool))
    with pytest.raises(ValueError, match=r"outputs_full shape \(6,\).*\(6, 3\)"):
        dm_direct(np.zeros(6), dm, [1])
    with pytest.raises(
        ValueError, match=r"heldout_masks shape \(5, 25\).*heldout_outputs shape \(4, 6, 3\)"
    ):
        lds(dm, masks[:5], outputs[:4])
    with pytest.raises(ValueError, match=r"heldout_outputs shape \(5, 6\).*\(6, 3\)"):
        lds(dm, masks[:5], outputs[:5, :, 0])


@pytest.mark.parametrize("m", [40, 16], ids=["primal", "dual"])
@pytest.mark.parametrize("estimator", ["ridge_dual", "diff_means"])
def test_forget_shift_direct_equals_the_fitted_shift(estimator, m):
    """The one-solve fast path for Σ_F β equals fit-then-shift (and the dense β sum), with the
    primal (M > N) and the dual (M <= N) ridge system."""
    from pipeline_lib.attribution.datamodels import forget_shift_direct

    rng = np.random.default_rng(5)
    masks = rng.random((m, 23)) < 0.5
    outputs = rng.normal(size=(m, 7, 3))
    forget = np.array([1, 4, 22, 9])
    dm = fit_datamodels(masks, outputs, lam=0.7, estimator=estimator, block=5)
    want = forget_shift(dm, forget)
    got = forget_shift_direct(masks, outputs, forget, lam=0.7, estimator=estimator, block=5)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, beta_dense(dm)[..., forget].sum(-1), rtol=1e-9, atol=1e-12)
    if estimator == "ridge_dual":  # the dense primal normal equations, then the cached factor
        beta_ref, _ = ridge_primal_reference(masks, outputs, 0.7)
        np.testing.assert_allclose(got, beta_ref[..., forget].sum(-1), rtol=1e-9, atol=1e-12)
        from pipeline_lib.attribution.datamodels import ridge_factor

        L = ridge_factor(masks, lam=0.7)
        size = min(m, 23)  # the smaller system: (N, N) primal, (M, M) dual
        assert L.shape == (size, size) and np.allclose(L, np.tril(L))
        again = forget_shift_direct(masks, outputs, forget, lam=0.7, factor=L)
        np.testing.assert_allclose(again, want, rtol=1e-10, atol=1e-12)
        # either system, forced, gives the same shift (push-through identity)
        for form, n in (("dual", m), ("primal", 23)):
            Lf = ridge_factor(masks, lam=0.7, form=form)
            assert Lf.shape == (n, n)
            np.testing.assert_allclose(
                forget_shift_direct(masks, outputs, forget, lam=0.7, factor=Lf),
                want,
                rtol=1e-9,
                atol=1e-12,
            )
        with pytest.raises(ValueError, match="factor shape"):
            forget_shift_direct(masks, outputs, forget, lam=0.7, factor=L[:3, :3])
    with pytest.raises(ValueError, match="outputs must have shape"):
        forget_shift_direct(masks, outputs[:3], forget)


def test_large_ridge_systems_use_one_blas_thread(monkeypatch):
    """Past BLAS_ONE_THREAD_ABOVE the factor is taken with one BLAS thread (OpenBLAS segfaults
    multi-threaded at 16,000, module comment); the results do not change."""
    import scipy.linalg
    from threadpoolctl import threadpool_info

    masks, outputs = _small(seed=3, m=40)
    want = fit_datamodels(masks, outputs, lam=0.7).weights
    seen = []
    real = scipy.linalg.cho_factor

    def spy(*args, **kwargs):
        seen.append(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "cho_factor", spy)
    monkeypatch.setattr(datamodels, "BLAS_ONE_THREAD_ABOVE", 10)  # the primal system is 25
    got = fit_datamodels(masks, outputs, lam=0.7).weights
    monkeypatch.setattr(datamodels, "BLAS_ONE_THREAD_ABOVE", 8192)
    fit_datamodels(masks, outputs, lam=0.7)
    assert seen[0] == 1
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
