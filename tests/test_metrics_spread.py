"""Spread of the seeded MIA metrics and of Avg. Gap (pipeline_lib/evaluation/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_lib.evaluation.metrics import (
    avg_gap,
    avg_gap_draws,
    build_report,
    draw_spread,
    format_table,
    loss_mia_auc,
    loss_mia_auc_draws,
    mean_std,
    metrics_from_logits,
    mia_efficacy,
    mia_efficacy_draws,
    mia_seed_list,
)


@pytest.fixture(scope="module")
def logits():
    """A 3-class problem whose confidences overlap between members and non-members, so the
    SVC's decision depends on which retain points it is fitted on."""
    g = torch.Generator().manual_seed(0)
    n = {"f": 40, "r": 200, "t": 60}
    out = {}
    for k, size in n.items():
        y = torch.randint(0, 3, (size,), generator=g)
        z = torch.randn(size, 3, generator=g) * 1.5
        z[torch.arange(size), y] += 1.0 if k != "t" else 0.6
        out[k] = (z, y)
    return out


def test_seed_list():
    assert mia_seed_list(7, 3) == [7, 8, 9]
    assert mia_seed_list(0, 1) == [0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_seeds"):
            mia_seed_list(0, bad)


def test_draws_are_the_single_metric_per_seed(logits):
    (lf, yf), (lr, yr), (lt, yt) = logits["f"], logits["r"], logits["t"]
    m1 = metrics_from_logits(lf, yf, lr, yr, lt, yt, 3.0, 5, 11)
    m5 = metrics_from_logits(lf, yf, lr, yr, lt, yt, 3.0, 5, 11, n_seeds=5)
    # one draw is the old single number, with no spread
    assert m1["MIA_efficacy_draws"] == [m1["MIA_efficacy"]]
    assert m1["MIA_efficacy_std"] == 0.0 and m1["loss_MIA_AUC_std"] == 0.0
    # five draws: seeds 11..15; the first is the single draw; the mean and std are theirs
    assert m5["MIA_efficacy_draws"][0] == m1["MIA_efficacy"]
    assert m5["loss_MIA_AUC_draws"][0] == m1["loss_MIA_AUC"]
    from pipeline_lib.evaluation.metrics import confidence, per_sample_loss

    cr, ct, cf = confidence(lr, yr), confidence(lt, yt), confidence(lf, yf)
    by_hand = [mia_efficacy(cr, ct, cf, 3.0, s) for s in range(11, 16)]
    assert m5["MIA_efficacy_draws"] == by_hand
    np.testing.assert_array_equal(mia_efficacy_draws(cr, ct, cf, 3.0, range(11, 16)), by_hand)
    lf_, lt_ = per_sample_loss(lf, yf), per_sample_loss(lt, yt)
    aucs = [loss_mia_auc(lf_, lt_, 5, s) for s in range(11, 16)]
    np.testing.assert_array_equal(loss_mia_auc_draws(lf_, lt_, 5, range(11, 16)), aucs)
    assert m5["MIA_efficacy"] == pytest.approx(np.mean(by_hand))
    assert m5["MIA_efficacy_std"] == pytest.approx(np.std(by_hand, ddof=1))
    assert m5["loss_MIA_AUC_std"] == pytest.approx(np.std(aucs, ddof=1))
    # the seed matters here: a single draw would hide it
    assert m5["MIA_efficacy_std"] > 0 and m5["loss_MIA_AUC_std"] > 0
    # accuracies do not depend on the seed
    assert {k: m5[k] for k in ("UA", "RA", "TA")} == {k: m1[k] for k in ("UA", "RA", "TA")}


def test_avg_gap_pairs_the_draws():
    base = {"UA": 10.0, "RA": 90.0, "TA": 80.0}
    model = {**base, "MIA_efficacy": 20.0, "MIA_efficacy_draws": [10.0, 30.0]}
    oracle = {**base, "UA": 12.0, "MIA_efficacy": 20.0, "MIA_efficacy_draws": [30.0, 10.0]}
    # draw 1: |10 − 30| = 20, draw 2: |30 − 10| = 20; UA gap 2 in both → (2 + 20) / 4
    np.testing.assert_allclose(avg_gap_draws(model, oracle), [5.5, 5.5])
    # the gap of the means hides the disagreement: (2 + 0) / 4
    assert avg_gap(model, oracle) == 0.5
    # without draws (or a different number of them): the single gap
    plain = {k: v for k, v in model.items() if k != "MIA_efficacy_draws"}
    np.testing.assert_allclose(avg_gap_draws(plain, oracle), [0.5])
    rep = build_report({"unlearned": model, "oracle": oracle}, 1.0, 2.0)
    assert rep["models"]["unlearned"]["avg_gap"] == 5.5
    assert rep["models"]["unlearned"]["avg_gap_std"] == 0.0
    assert rep["models"]["oracle"]["avg_gap"] == 0.0
    # unequal draws give a spread
    model2 = {**model, "MIA_efficacy_draws": [10.0, 50.0]}
    rep2 = build_report({"unlearned": model2, "oracle": oracle}, 1.0, 2.0)
    assert rep2["models"]["unlearned"]["avg_gap"] == pytest.approx((5.5 + 10.5) / 2)
    assert rep2["models"]["unlearned"]["avg_gap_std"] == pytest.approx(np.std([5.5, 10.5], ddof=1))
    table = format_table(rep2)
    assert "8.000±3.536" in table  # mean±std where there is a spread
    assert "0.000±" not in table  # no ± on the oracle's zero-spread row


def test_draw_spread_components():
    d = np.array([[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]])  # 3 models × 2 seeds
    s = draw_spread(d)
    assert s["mean"] == 6.0
    assert s["std"] == pytest.approx(np.std(d, ddof=1))
    assert s["model_std"] == pytest.approx(np.std([2.0, 6.0, 10.0], ddof=1))
    assert s["seed_std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    one = draw_spread(d[:, :1])
    assert one["seed_std"] == 0.0 and one["std"] == one["model_std"]
    assert mean_std([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        draw_spread(np.zeros(3))


# ------------------------------------------------- the comparison table (pure: no Ray, no flow)


def _fake_metrics(rng: np.random.Generator, mia_mean: float, n_seeds: int) -> dict:
    draws = list(mia_mean + rng.normal(0.0, 3.0, size=n_seeds))
    aucs = list(0.5 + rng.normal(0.0, 0.02, size=n_seeds))
    m = {"UA": float(rng.uniform(0, 5)), "RA": 99.0, "TA": float(rng.uniform(90, 95))}
    m.update(
        MIA_efficacy=float(np.mean(draws)),
        MIA_efficacy_draws=draws,
        loss_MIA_AUC=float(np.mean(aucs)),
        loss_MIA_AUC_draws=aucs,
    )
    return m


@pytest.fixture(scope="module")
def comparison():
    from pipeline_lib.comparison import Problem

    rng = np.random.default_rng(0)
    t, n, s = 100, 12, 3
    forget, retain, val = np.arange(40), np.arange(40, 80), np.arange(80, 100)
    problem = Problem(torch.zeros(t, 1), torch.zeros(t, dtype=torch.long), forget, retain, val, 2)
    base = rng.normal(0.0, 3.0, size=t)

    def margins(shift_forget: float) -> np.ndarray:
        m = base + rng.normal(size=(n, t))
        m[:, forget] += shift_forget
        return m.astype(np.float32)

    originals = margins(3.0)  # the forget points were trained on: higher margins
    oracles = margins(0.0).astype(np.float64)
    exact = margins(0.0)  # an exact unlearner
    runs = {
        "none": [
            {"margins": originals[k], "metrics": _fake_metrics(rng, 5.0, s), "seconds": 0.0}
            for k in range(n)
        ],
        # given out of order: summarise pairs unlearned model k with original k by model_id
        "exact": [
            {
                "model_id": k,
                "margins": exact[k],
                "metrics": _fake_metrics(rng, 12.0, s),
                "seconds": 1.0,
            }
            for k in reversed(range(n))
        ],
    }
    oracle_metrics = [_fake_metrics(rng, 12.0, s) for _ in range(n)]
    return problem, runs, oracles, oracle_metrics, originals


def test_summarise_reports_spread_ulira_and_binning(comparison):
    from pipeline_lib.comparison import markdown_table, summarise

    problem, runs, oracles, oracle_metrics, originals = comparison
    rows, floor, _ = summarise(
        runs, oracles, oracle_metrics, problem, 2.0, original_margins=originals
    )
    by = {r["method"]: r for r in rows}
    none, exact, oracle = by["none"], by["exact"], by["oracle (retrain)"]
    # MIA-efficacy over N models × S seeds
    d = np.array([r["metrics"]["MIA_efficacy_draws"] for r in runs["none"]])
    assert none["MIA_efficacy"] == pytest.approx(d.mean())
    assert none["MIA_efficacy_std"] == pytest.approx(np.std(d, ddof=1))
    assert none["MIA_efficacy_model_std"] == pytest.approx(np.std(d.mean(1), ddof=1))
    assert none["MIA_efficacy_seed_std"] == pytest.approx(np.mean(np.std(d, axis=1, ddof=1)))
    assert none["mia_seeds"] == 3 and none["loss_MIA_AUC_std"] > 0
    # Avg. Gap of (model k, seed s) against the oracles' mean at seed s, by hand for one draw
    om = {k: np.mean([m[k] for m in oracle_metrics]) for k in ("UA", "RA", "TA")}
    o_mia = np.mean([m["MIA_efficacy_draws"] for m in oracle_metrics], axis=0)
    m0 = runs["none"][0]["metrics"]
    g00 = (
        sum(abs(m0[k] - om[k]) for k in ("UA", "RA", "TA"))
        + abs(m0["MIA_efficacy_draws"][0] - o_mia[0])
    ) / 4
    gaps = []
    for r in runs["none"]:
        m = r["metrics"]
        fixed = sum(abs(m[k] - om[k]) for k in ("UA", "RA", "TA"))
        gaps += [(fixed + abs(v - o_mia[s])) / 4 for s, v in enumerate(m["MIA_efficacy_draws"])]
    assert gaps[0] == pytest.approx(g00)
    assert none["avg_gap"] == pytest.approx(np.mean(gaps))
    assert none["avg_gap_std"] == pytest.approx(np.std(gaps, ddof=1))
    assert none["avg_gap_of_means"] <= none["avg_gap"] + 1e-12
    # U-LiRA: doing nothing is detected, an exact unlearner and the oracle halves are not
    assert none["ulira_auc"] > 0.9 and none["lira_orig_auc"] > 0.9
    for r in (exact, oracle):
        assert abs(r["ulira_auc"] - 0.5) < 0.1 and abs(r["lira_orig_auc"] - 0.5) < 0.1, r
    # the table: spreads, the U-LiRA columns and the binning named
    md = markdown_table(rows, "t")
    assert f"{none['MIA_efficacy']:.2f} ± {none['MIA_efficacy_std']:.2f}" in md
    assert "U-LiRA AUC" in md and "LiRA-orig AUC" in md
    assert "KLoM binning: unlearnflow" in md and "EasyDUB bins" not in md
    assert none["klom_binning"] == "unlearnflow"
    # without originals (the tuner's call) LiRA-orig is NaN, U-LiRA still there
    rows2, _, _ = summarise(runs, oracles, oracle_metrics, problem, 2.0)
    assert np.isnan(rows2[0]["lira_orig_auc"]) and rows2[0]["ulira_auc"] == none["ulira_auc"]


def test_summarise_with_easydub_binning(comparison):
    from pipeline_lib.comparison import floor_scores, markdown_table, summarise
    from pipeline_lib.evaluation.klom import klom_scores, klom_summary, oracle_halves

    problem, runs, oracles, oracle_metrics, originals = comparison
    rows, floor, scores = summarise(runs, oracles, oracle_metrics, problem, 2.0, binning="easydub")
    um = np.stack([r["margins"] for r in runs["none"]])
    expect = klom_scores(um, oracles, binning="easydub")
    np.testing.assert_array_equal(scores["none"], expect)
    assert rows[0]["klom_forget_p95"] == klom_summary(expect[problem.forget])["p95"]
    a, b = oracle_halves(len(oracles))
    fs = klom_scores(oracles[a], oracles[b], binning="easydub")
    assert floor["retain"] == klom_summary(fs[problem.retain])
    np.testing.assert_array_equal(floor_scores(oracles, binning="easydub"), fs)
    md = markdown_table(rows)
    assert "KLoM (EasyDUB bins) forget P95" in md and "KLoM binning: easydub" in md
    assert all(r["klom_binning"] == "easydub" for r in rows)
