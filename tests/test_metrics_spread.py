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
