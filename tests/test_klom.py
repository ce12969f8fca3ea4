"""KLoM (pipeline_lib/klom.py): known values, invariants, the per-point reference, noise floor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline_lib.evaluation.klom import (
    _klom_point_reference,
    klom_report,
    klom_scores,
    klom_summary,
    noise_floor,
    oracle_halves,
)

FLOOR = 1e-5


def _two_bin_kl(a: int, b: int, c: int, d: int, bins: int = 20, floor: float = FLOOR) -> float:
    """KL by hand: p has counts (a, b) in the first/last bin, q has (c, d); floor then renormalise."""
    p = np.full(bins, floor)
    q = np.full(bins, floor)
    p[0], p[-1] = max(a / (a + b), floor), max(b / (a + b), floor)
    q[0], q[-1] = max(c / (c + d), floor), max(d / (c + d), floor)
    p, q = p / p.sum(), q / q.sum()
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))


def test_known_kl_closed_form():
    # unlearned: 3 at 0.0, 1 at 1.0; oracle: 1 at 0.0, 3 at 1.0 -> range [0, 1], bins 0 and 19
    u = np.array([[0.0], [0.0], [0.0], [1.0]])
    o = np.array([[0.0], [1.0], [1.0], [1.0]])
    got = klom_scores(u, o)[0]
    s = 1.0 + 18 * FLOOR  # row sum after flooring the 18 empty bins
    expected = (0.5 / s) * math.log(3.0)
    assert abs(got - expected) < 1e-12
    assert abs(got - _two_bin_kl(3, 1, 1, 3)) < 1e-12


@pytest.mark.parametrize(
    ("a", "b", "c", "d"), [(5, 0, 2, 3), (1, 4, 4, 1), (2, 2, 0, 6), (6, 1, 7, 0)]
)
def test_known_kl_with_empty_bins(a, b, c, d):
    # shift and scale the range: values at -3 and 7 still land in the first and last bin
    u = np.array([-3.0] * a + [7.0] * b)[:, None]
    o = np.array([-3.0] * c + [7.0] * d)[:, None]
    if min(u.min(), o.min()) == max(u.max(), o.max()):
        pytest.skip("degenerate range")
    got = klom_scores(u, o)[0]
    assert abs(got - _two_bin_kl(a, b, c, d)) < 1e-12


def test_identical_samples_give_zero():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(30, 40))
    np.testing.assert_array_equal(klom_scores(m, m.copy()), np.zeros(40))


def test_zero_range_point_is_zero():
    u = np.array([[2.0, 0.0], [2.0, 1.0]])
    o = np.array([[2.0, 5.0], [2.0, 6.0]])
    s = klom_scores(u, o)
    assert s[0] == 0.0
    assert s[1] > 0.0


def test_nonnegative_and_asymmetric():
    rng = np.random.default_rng(1)
    u = rng.normal(0.0, 1.0, size=(25, 200))
    o = rng.normal(0.5, 2.0, size=(40, 200))
    fwd = klom_scores(u, o)
    bwd = klom_scores(o, u)
    assert fwd.dtype == np.float64 and fwd.shape == (200,)
    assert np.all(fwd >= 0.0) and np.all(bwd >= 0.0)
    assert not np.allclose(fwd, bwd)


def test_clipping_equals_preclipped_input():
    rng = np.random.default_rng(2)
    u = rng.normal(0.0, 150.0, size=(20, 30))
    o = rng.normal(20.0, 150.0, size=(20, 30))
    assert np.abs(u).max() > 100 and np.abs(o).max() > 100
    np.testing.assert_array_equal(
        klom_scores(u, o), klom_scores(np.clip(u, -100, 100), np.clip(o, -100, 100))
    )
    # a smaller clip changes the answer: clipping is applied, not ignored
    assert not np.allclose(klom_scores(u, o, clip=10.0), klom_scores(u, o))


@pytest.mark.parametrize("bins", [20, 7])
def test_vectorised_matches_per_point_reference(bins):
    rng = np.random.default_rng(3)
    t = 50
    u = rng.normal(size=(30, t)) * rng.uniform(0.1, 80, size=t)
    o = rng.normal(size=(17, t)) * rng.uniform(0.1, 80, size=t) + rng.normal(size=t)
    u[:, :5] = np.round(u[:, :5])  # ties and values on bin edges
    o[:, :5] = np.round(o[:, :5])
    u[:, 5] = 250.0  # beyond the clip
    got = klom_scores(u, o, bins=bins)
    ref = np.array([_klom_point_reference(u[:, i], o[:, i], bins=bins) for i in range(t)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_edge_values_binned_like_numpy_histogram():
    # values on interior edges, where index = floor((x - lo) / (hi - lo) * bins) can be 1 ulp off
    lo, hi = -1.3, 2.9
    edges = np.linspace(lo, hi, 21)
    u = np.tile(edges, 3)[:, None]
    o = np.concatenate([edges[::2], edges[1::3]])[:, None]
    ref = _klom_point_reference(u[:, 0], o[:, 0])
    assert abs(klom_scores(u, o)[0] - ref) < 1e-12


def test_summary_matches_numpy_percentile():
    s = np.random.default_rng(4).exponential(size=333)
    out = klom_summary(s)
    assert out == {
        "p95": float(np.percentile(s, 95)),
        "p99": float(np.percentile(s, 99)),
        "mean": float(np.mean(s)),
    }


def test_report_splits_mask_and_indices_agree():
    rng = np.random.default_rng(5)
    u = rng.normal(size=(10, 60))
    o = rng.normal(1.0, 1.0, size=(10, 60))
    mask = np.zeros(60, dtype=bool)
    mask[:20] = True
    rep = klom_report(u, o, {"forget": mask, "retain": np.arange(20, 60)})
    scores = klom_scores(u, o)
    assert rep["forget"] == klom_summary(scores[:20])
    assert rep["retain"] == klom_summary(scores[20:])


def test_oracle_halves_disjoint_and_seeded():
    a, b = oracle_halves(201, seed=7)
    assert len(a) == len(b) == 100
    assert not set(a) & set(b)
    assert set(a) | set(b) <= set(range(201))
    a2, b2 = oracle_halves(201, seed=7)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    a3, _ = oracle_halves(201, seed=8)
    assert not np.array_equal(a, a3)


def test_noise_floor_small_and_below_real_shift():
    # 400 oracles -> halves of 200; with halves of 100 the p95 floor is ~0.65 (tail bins that
    # hold one count in one half and none in the other each add ~0.01 * log(1e3))
    rng = np.random.default_rng(6)
    t = 100
    oracles = rng.normal(0.0, 1.0, size=(400, t))
    shifted = rng.normal(5.0, 1.0, size=(200, t))
    splits = {"forget": np.arange(10), "retain": np.arange(10, t)}
    nf = noise_floor(oracles, splits, seed=0)
    far = klom_report(shifted, oracles[:200], splits)
    for name in splits:
        assert 0.0 < nf[name]["p95"] < 0.5
        assert far[name]["p95"] > 10 * nf[name]["p95"]
    # the floor is exactly KLoM between the two seeded halves
    a, b = oracle_halves(400, seed=0)
    assert nf == klom_report(oracles[a], oracles[b], splits)
    # and it shrinks as the number of oracles grows
    small = noise_floor(oracles[:100], splits, seed=0)
    assert small["retain"]["p95"] > nf["retain"]["p95"]


@pytest.mark.parametrize(
    ("u", "o", "match"),
    [
        (np.zeros(5), np.zeros((3, 5)), r"2-D.*\(5,\)"),
        (np.zeros((3, 5)), np.zeros((3, 4)), r"\(3, 5\).*\(3, 4\).*same T"),
        (np.zeros((1, 5)), np.zeros((3, 5)), r"at least 2 models.*\(1, 5\)"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), np.zeros((2, 2)), "non-finite"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), np.zeros((2, 2)), "non-finite"),
    ],
)
def test_input_validation(u, o, match):
    with pytest.raises(ValueError, match=match):
        klom_scores(u, o)


def test_parameter_and_split_validation():
    m = np.random.default_rng(8).normal(size=(4, 6))
    with pytest.raises(ValueError, match="bins"):
        klom_scores(m, m, bins=0)
    with pytest.raises(ValueError, match="floor"):
        klom_scores(m, m, floor=0.0)
    with pytest.raises(ValueError, match="at least 4"):
        noise_floor(m[:3], {"all": np.arange(6)})
    with pytest.raises(ValueError, match="shape"):
        klom_report(m, m, {"bad": np.ones(5, dtype=bool)})
    with pytest.raises(ValueError, match="selects no points"):
        klom_report(m, m, {"empty": np.zeros(6, dtype=bool)})
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        klom_report(m, m, {"oob": np.array([0, 6])})


# ------------------------------------------------------------ EasyDUB's binning (issue 16)


def _easydub_point(p_samples, q_samples, bin_count=20, eps=1e-5, lo_clip=-100.0, hi_clip=100.0):
    """A transcription of EasyDUB's published per-point formula (easydub/eval.py,
    ``binned_kl_divergence``), one point at a time, loops and all."""
    p_arr = np.clip(np.asarray(p_samples, dtype=np.float64), lo_clip, hi_clip)
    q_arr = np.clip(np.asarray(q_samples, dtype=np.float64), lo_clip, hi_clip)
    start = min(p_arr.min(), q_arr.min())
    end = max(p_arr.max(), q_arr.max())
    if start >= end:
        end = start + 1.0
    edges = np.linspace(start, end, bin_count + 1)
    p_idx = np.digitize(p_arr, edges)
    q_idx = np.digitize(q_arr, edges)
    p_counts = np.array([np.sum(p_idx == i) for i in range(1, bin_count + 1)])
    q_counts = np.array([np.sum(q_idx == i) for i in range(1, bin_count + 1)])
    p_probs = p_counts / p_counts.sum() if p_counts.sum() > 0 else np.zeros(bin_count)
    q_probs = q_counts / q_counts.sum() if q_counts.sum() > 0 else np.zeros(bin_count)
    q_safe = np.where(p_probs > 0.0, np.maximum(q_probs, eps), q_probs)
    keep = p_probs > 0.0
    return float(np.sum(p_probs[keep] * np.log(p_probs[keep] / q_safe[keep])))


def _fixed_margins() -> tuple[np.ndarray, np.ndarray]:
    """Fixed margins with every case the two binnings treat differently."""
    rng = np.random.default_rng(11)
    t = 120
    u = rng.normal(size=(20, t)) * rng.uniform(0.5, 30, size=t) + rng.normal(2, 3, size=t)
    o = rng.normal(size=(20, t)) * rng.uniform(0.5, 30, size=t)
    u[:, :6], o[:, :6] = np.round(u[:, :6]), np.round(o[:, :6])  # ties on interior edges
    u[:, 6] = 150.0  # every unlearned model clipped at the pooled maximum: all dropped
    u[:3, 7] = 120.0  # three unlearned models share the clipped maximum
    o[:, 8] = 250.0  # every oracle dropped (q = 0 where p > 0: the floor alone)
    u[:, 9] = o[:, 9] = 4.0  # zero range
    o[0, 10] = u[:, 10].max() + 5.0  # the maximum is one oracle
    return u, o


def test_easydub_binning_matches_a_transcription_of_its_formula():
    u, o = _fixed_margins()
    got = klom_scores(u, o, binning="easydub")
    ref = np.array([_easydub_point(u[:, i], o[:, i]) for i in range(u.shape[1])])
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    # unequal model counts and other bins / floor / clip
    ref7 = [_easydub_point(u[:, i], o[:13, i], 7, 1e-3, -10, 10) for i in range(u.shape[1])]
    got7 = klom_scores(u, o[:13], bins=7, clip=10.0, floor=1e-3, binning="easydub")
    np.testing.assert_allclose(got7, ref7, rtol=1e-12, atol=1e-15)


def test_easydub_differs_from_ours_where_the_maximum_is_dropped():
    u, o = _fixed_margins()
    ours = klom_scores(u, o)
    easy = klom_scores(u, o, binning="easydub")
    # all unlearned margins at the pooled maximum: EasyDUB counts none of them and scores 0;
    # ours puts them in the last bin, where the oracles have nothing, and scores high
    assert easy[6] == 0.0 and ours[6] > 5.0
    assert easy[9] == ours[9] == 0.0  # a zero range is 0 in both
    # identical samples: one copy of the maximum is dropped from each side alike, and the
    # rest agree, so both give 0 (ours: exactly; EasyDUB: the floor is unused)
    m = np.random.default_rng(12).normal(size=(20, 30))
    assert np.all(klom_scores(m, m.copy(), binning="easydub") == 0.0)
    assert np.mean(np.abs(ours - easy) > 1e-9) > 0.5  # they are different estimators


def test_easydub_noise_floor_and_report_pass_the_binning_through():
    u, o = _fixed_margins()
    splits = {"forget": np.arange(10), "retain": np.arange(10, 120)}
    rep = klom_report(u, o, splits, binning="easydub")
    assert rep["retain"] == klom_summary(klom_scores(u, o, binning="easydub")[10:])
    oracles = np.random.default_rng(13).normal(size=(40, 50))
    nf = noise_floor(oracles, {"all": np.arange(50)}, binning="easydub")
    a, b = oracle_halves(40)
    ref = [_easydub_point(oracles[a, i], oracles[b, i]) for i in range(50)]
    assert nf["all"] == klom_summary(np.array(ref))
    with pytest.raises(ValueError, match="binning must be one of unlearnflow, easydub"):
        klom_scores(u, o, binning="scipy")
