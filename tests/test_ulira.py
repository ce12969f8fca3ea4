"""U-LiRA and LiRA against the original (pipeline_lib/evaluation/ulira.py) on synthetic
populations of φ where the answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline_lib.evaluation.ulira import (
    fit_gaussians,
    likelihood_ratio,
    lira_scores,
    logit_confidence,
    membership_summary,
    roc_auc,
    tpr_at_fpr,
    ulira_auc,
)


def _phi(rng: np.random.Generator, n: int, mu: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """n models' φ at len(mu) points: per-point mean mu, common std sigma."""
    return mu + sigma * rng.normal(size=(n, mu.size))


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@pytest.fixture(scope="module")
def world():
    """Per-point means: oracles (out) at mu, originals (in) at mu + delta; unit std."""
    rng = np.random.default_rng(0)
    t = 300
    mu = rng.normal(0.0, 3.0, size=t)  # points differ a lot: per-example fits matter
    return rng, mu, 1.0


def test_logit_confidence_is_log_odds_of_the_true_label():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0], [30.0, -30.0, 0.0]])
    y = np.array([0, 1, 0])
    p = logits.double().softmax(-1).numpy()[np.arange(3), y]
    got = logit_confidence(logits.numpy(), y)
    np.testing.assert_allclose(got[:2], np.log(p[:2]) - np.log1p(-p[:2]), rtol=1e-12)
    # p_y = 1 − ~1e-13: the naive log(1 − p) loses most digits; the margin does not
    assert got[2] == pytest.approx(30.0 - np.log1p(np.exp(-30.0)), rel=1e-12)
    naive = np.log(p[2]) - np.log1p(-p[2])
    assert abs(naive - got[2]) > 1e-4  # through p, the same number loses digits


def test_oracle_scores_half_and_original_scores_high(world):
    rng, mu, s = world
    delta = 1.0
    originals = _phi(rng, 40, mu + delta, s)
    oracles = _phi(rng, 40, mu, s)
    # an exact unlearner: fresh models from the oracles' distribution
    exact = _phi(rng, 40, mu, s)
    for shadow in (None, originals):  # U-LiRA and LiRA against the original
        r = ulira_auc(exact, oracles, shadow, seed=1)
        assert abs(r["auc"] - 0.5) < 0.03, r
    # doing nothing: the unlearned models are the originals. Equal-variance Gaussians one delta
    # apart: Λ is N(±δ²/2, δ²) under in/out, so AUC = Φ(δ / √2) ≈ 0.760 (fits on 20 models
    # per fold cost a little)
    expect = _norm_cdf(delta / math.sqrt(2.0))
    nothing_u = ulira_auc(originals, oracles, seed=1)
    nothing_l = ulira_auc(originals, oracles, originals, seed=1)
    for r in (nothing_u, nothing_l):
        assert expect - 0.04 < r["auc"] < expect + 0.01, (r, expect)
        assert r["tpr_at_1pct_fpr"] > 0.01  # above chance at the low-FPR end
    # a larger shift is easier to detect
    far = ulira_auc(_phi(rng, 40, mu + 2.5, s), oracles, seed=1)
    assert far["auc"] > 0.95 and far["tpr_at_1pct_fpr"] > nothing_u["tpr_at_1pct_fpr"]


def test_over_forgetting_is_caught_by_ulira_not_by_lira_against_the_original(world):
    rng, mu, s = world
    originals = _phi(rng, 30, mu + 1.0, s)
    oracles = _phi(rng, 30, mu, s)
    overshoot = _phi(rng, 30, mu - 1.5, s)  # pushed past the oracles
    u = ulira_auc(overshoot, oracles, seed=2)
    lira = ulira_auc(overshoot, oracles, originals, seed=2)
    assert u["auc"] > 0.8
    # one-sided: it reads "less in than the oracles". With known Gaussians Λ is N(−2, 1) for
    # the unlearned and N(−0.5, 1) for oracles: AUC Φ(−1.5/√2) ≈ 0.14; fitted σ's add noise
    assert lira["auc"] < 0.3


def test_cross_fitting_keeps_few_models_honest():
    # 6 models per side: fitting the in-Gaussian on the very models it scores would make
    # identical distributions look separable; the held-out folds keep the AUC near 0.5
    rng = np.random.default_rng(3)
    mu = rng.normal(0.0, 2.0, size=2000)
    a, b = _phi(rng, 6, mu), _phi(rng, 6, mu)
    honest = ulira_auc(a, b, n_folds=3, seed=0)["auc"]
    leaky = roc_auc(
        likelihood_ratio(a, fit_gaussians(a), fit_gaussians(b)),
        likelihood_ratio(b, fit_gaussians(a), fit_gaussians(b)),
    )
    assert abs(honest - 0.5) < 0.03
    assert leaky > 0.6


def test_scores_are_held_out_and_in_row_order():
    rng = np.random.default_rng(4)
    mu = rng.normal(size=50)
    t, s, o = _phi(rng, 8, mu + 1), _phi(rng, 8, mu + 1), _phi(rng, 10, mu)
    pos, neg = lira_scores(t, s, o, n_folds=2, seed=5)
    assert pos.shape == t.shape and neg.shape == o.shape
    # recompute target 0's score by hand from the models outside its fold
    perm_rng = np.random.default_rng(5)
    ft = np.empty(8, dtype=int)
    ft[perm_rng.permutation(8)] = np.arange(8) % 2
    fo = np.empty(10, dtype=int)
    fo[perm_rng.permutation(10)] = np.arange(10) % 2
    j = ft[0]
    manual = likelihood_ratio(t[:1], fit_gaussians(s[ft != j]), fit_gaussians(o[fo != j]))
    np.testing.assert_allclose(pos[0], manual[0], rtol=1e-12)
    # changing the paired shadow of target 0 does not change target 0's own score
    s2 = s.copy()
    s2[0] += 100.0
    pos2, _ = lira_scores(t, s2, o, n_folds=2, seed=5)
    np.testing.assert_array_equal(pos2[0], pos[0])
    assert not np.allclose(pos2[ft != j], pos[ft != j])


def test_fixed_variance_pools_one_sigma():
    rng = np.random.default_rng(6)
    phi = rng.normal(size=(20, 5)) * np.array([0.1, 1, 2, 3, 4])
    mu, sd = fit_gaussians(phi)
    np.testing.assert_allclose(sd, phi.std(axis=0))
    _, sd_fixed = fit_gaussians(phi, fixed_variance=True)
    np.testing.assert_allclose(sd_fixed, np.sqrt(phi.var(axis=0).mean()))
    # identical models: σ floored, scores finite
    _, sd0 = fit_gaussians(np.ones((4, 3)))
    assert np.all(sd0 > 0)
    r = ulira_auc(np.ones((4, 3)), np.ones((4, 3)))
    assert r["auc"] == 0.5


def test_roc_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(7)
    pos = rng.integers(0, 5, size=37).astype(float)
    neg = rng.integers(0, 4, size=23).astype(float)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(pos, neg) == pytest.approx(pairs, abs=1e-12)
    assert roc_auc(np.array([3.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_tpr_at_fpr_by_hand():
    neg = np.arange(200, dtype=float)  # 0..199
    pos = np.array([198.5, 199.5, 250.0, 10.0])
    # 1% of 200 = 2 false positives allowed: threshold 197 flags 198, 199 → pos > 197: 3 of 4
    assert tpr_at_fpr(pos, neg, 0.01) == 0.75
    # 0.5%: one false positive allowed: threshold 198 → 198.5, 199.5, 250
    assert tpr_at_fpr(pos, neg, 0.005) == 0.75
    # 0.1% of 200 < 1 negative: not resolvable
    assert math.isnan(tpr_at_fpr(pos, neg, 0.001))
    s = membership_summary(pos, neg)
    assert set(s) == {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "n_pos", "n_neg"}
    assert s["n_neg"] == 200 and s["n_pos"] == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": np.zeros(5)}, "2-D"),
        ({"shadow_in": np.zeros((3, 5))}, "pair row for row"),
        ({"oracles": np.zeros((4, 6))}, "same T"),
        ({"targets": np.full((4, 5), np.nan)}, "non-finite"),
        ({"n_folds": 1}, "n_folds"),
        ({"n_folds": 5}, "at least 5"),
    ],
)
def test_input_validation(kwargs, match):
    args = {"targets": np.zeros((4, 5)), "shadow_in": np.zeros((4, 5)), "oracles": np.zeros((4, 5))}
    folds = kwargs.pop("n_folds", 2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lira_scores(args["targets"], args["shadow_in"], args["oracles"], n_folds=folds)
