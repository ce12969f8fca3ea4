"""Unlearning methods, the masked trainer, and the evaluation helpers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline_lib.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    UnlearnConfig,
)
from pipeline_lib.evaluation.metrics import (
    EvalSplits,
    accuracy,
    avg_gap,
    build_report,
    confidence,
    evaluate_model,
    format_table,
    loss_mia_auc,
    mia_efficacy,
    per_sample_loss,
    plot_report,
)
from pipeline_lib.methods import (
    METHODS,
    UnlearnInputs,
    fisher_diagonal_forgetting,
    get_method,
    select_by_ratio,
)
from pipeline_lib.methods.finetune import FinetuneParams, RetrainParams
from pipeline_lib.methods.fisher_diagonal import FisherDiagonalParams
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

SHAPE = (1, 8, 8)
N_CLASSES = 4
CFG = ModelConfig(name="mlp", hidden=(12,))


pytestmark = pytest.mark.usefixtures("one_thread")


def _factory(seed: int) -> nn.Module:
    return build_model(CFG, SHAPE, N_CLASSES, seed)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    # Class-dependent means so a tiny MLP actually learns something.
    X = torch.rand((n, *SHAPE), generator=gen) * 0.5
    X[:, 0, 0, :] += nn.functional.one_hot(y, 8).float()
    return X, y


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    model = _factory(0)
    X, y = _data(96, 0)
    return fit(model, X, y, FitSettings(epochs=3, batch_size=16, lr=1e-2), seed=0)


@pytest.fixture(scope="module")
def inputs(trained: nn.Module) -> UnlearnInputs:
    fX, fy = _data(24, 1)
    rX, ry = _data(72, 2)
    return UnlearnInputs(
        forget_X=fX,
        forget_y=fy,
        retain_X=rX,
        retain_y=ry,
        model_factory=_factory,
        train=TrainConfig(epochs=2, batch_size=16, lr=1e-2, device="cpu"),
        fisher_forget=fisher_diagonal(trained, fX, fy),
        fisher_retain=fisher_diagonal(trained, rX, ry),
    )


def _copy(model: nn.Module) -> nn.Module:
    clone = _factory(123)
    clone.load_state_dict(model.state_dict())
    return clone


# --------------------------------------------------------------------------- registry


def test_get_method_unknown_lists_methods() -> None:
    with pytest.raises(ConfigError, match=r"'nope'; valid: " + ", ".join(sorted(METHODS)) + "$"):
        get_method("nope")
    assert {"finetune", "fisher_diagonal", "retrain", "dmm", "oracle_matching"} <= set(METHODS)
    assert get_method("fisher_diagonal").needs_fisher
    assert not get_method("retrain").needs_fisher
    # every method's hyper-parameters are the typed section unlearn.<name> of params.yaml
    fields = {f.name: f.type for f in dataclasses.fields(UnlearnConfig)}
    for name, m in METHODS.items():
        assert isinstance(UnlearnConfig().method_params(name), m.params_type), name
        assert name in fields


# --------------------------------------------------------------------------- selection


def _random_stats(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 5)}
    forget = {k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    retain = {k: torch.rand(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    return forget, retain


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 1.0])
def test_select_top_fraction_picks_largest_ratios(fraction: float) -> None:
    forget, retain = _random_stats(0)
    eps = 1e-3
    masks, gamma = select_by_ratio(forget, retain, eps, None, fraction)
    assert masks.keys() == forget.keys()
    ratio = torch.cat([(forget[k] / (retain[k] + eps)).flatten() for k in sorted(forget)])
    chosen = torch.cat([masks[k].flatten() for k in sorted(forget)])
    n = ratio.numel()  # 25
    assert int(chosen.sum()) == max(1, round(fraction * n))
    for k in forget:
        assert masks[k].shape == forget[k].shape and masks[k].dtype == torch.bool
    assert gamma == pytest.approx(float(ratio[chosen].min()))
    if not chosen.all():
        assert float(ratio[chosen].min()) > float(ratio[~chosen].max())
    expected = set(torch.topk(ratio, int(chosen.sum())).indices.tolist())
    assert set(torch.nonzero(chosen).flatten().tolist()) == expected


def test_select_top_fraction_exact_count_with_ties() -> None:
    forget = {"w": torch.ones(10)}
    retain = {"w": torch.ones(10)}
    masks, _ = select_by_ratio(forget, retain, 0.0, None, 0.3)
    assert int(masks["w"].sum()) == 3


def test_select_threshold() -> None:
    forget, retain = _random_stats(1)
    masks, gamma = select_by_ratio(forget, retain, 1e-8, 1.5, 0.2)
    assert gamma == 1.5
    for k in forget:
        expected = forget[k] / (retain[k] + 1e-8) > 1.5
        assert torch.equal(masks[k], expected)
    total = sum(int(m.sum()) for m in masks.values())
    assert 0 < total < 25  # the threshold, not top_fraction (which would give 5), decides


def test_select_errors() -> None:
    forget, retain = _random_stats(2)
    with pytest.raises(ValueError, match="different parameters"):
        select_by_ratio(forget, {k: v for k, v in retain.items() if k != "a.bias"}, 1e-8, None, 0.2)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="top_fraction must be in"):
            select_by_ratio(forget, retain, 1e-8, None, bad)


# --------------------------------------------------------------------------- masked fit


@pytest.mark.parametrize(
    "settings",
    [
        FitSettings(epochs=2, batch_size=16, lr=1e-2),
        FitSettings(epochs=2, batch_size=16, lr=1e-2, weight_decay=0.1),
        FitSettings(epochs=2, batch_size=16, lr=1e-1, optimizer="sgd", momentum=0.9),
        FitSettings(epochs=2, batch_size=16, lr=1e-1, optimizer="sgd", weight_decay=0.1),
    ],
    ids=["adam", "adam-wd", "sgd-momentum", "sgd-wd"],
)
def test_masked_fit_keeps_unselected_entries_exact(settings: FitSettings) -> None:
    model = _factory(0)
    before = _state(model)
    gen = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.3 for k, v in before.items()}
    frozen_name = "net.1.bias"
    masks[frozen_name] = torch.zeros_like(masks[frozen_name])  # nothing selected here
    X, y = _data(64, 3)
    fit(model, X, y, settings, seed=0, grad_mask=masks)
    after = _state(model)
    n_sel = n_moved = 0
    for k, m in masks.items():
        assert torch.equal(after[k][~m], before[k][~m]), k
        n_sel += int(m.sum())
        n_moved += int((after[k][m] != before[k][m]).sum())
    assert n_sel > 0 and n_moved > 0.5 * n_sel
    assert torch.equal(after[frozen_name], before[frozen_name])
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_fit_is_seeded_and_moves_everything_unmasked() -> None:
    X, y = _data(64, 3)
    s = FitSettings(epochs=2, batch_size=16, lr=1e-2)
    a = _state(fit(_factory(0), X, y, s, seed=1))
    b = _state(fit(_factory(0), X, y, s, seed=1))
    c = _state(fit(_factory(0), X, y, s, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    init = _state(_factory(0))
    assert all(not torch.equal(a[k], init[k]) for k in a)


def test_fit_errors_and_no_selection() -> None:
    X, y = _data(8, 0)
    s = FitSettings(epochs=1, batch_size=4, lr=1e-2)
    with pytest.raises(ValueError, match="empty training set"):
        fit(_factory(0), X[:0], y[:0], s, seed=0)
    with pytest.raises(KeyError, match="unknown parameter 'nope'"):
        fit(_factory(0), X, y, s, seed=0, grad_mask={"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        fit(_factory(0), X, y, FitSettings(1, 4, 1e-2, optimizer="rmsprop"), seed=0)
    model = _factory(0)
    before = _state(model)
    masks = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in before.items()}
    fit(model, X, y, s, seed=0, grad_mask=masks)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("reset", ["zero", "reinit"])
def test_fisher_diagonal_forgetting_touches_only_selected(
    trained: nn.Module, inputs: UnlearnInputs, reset: str
) -> None:
    original = _state(trained)
    params = FisherDiagonalParams(top_fraction=0.2, reset=reset, epochs=2, lr=1e-2, batch_size=16)
    model, info = fisher_diagonal_forgetting(_copy(trained), inputs, params, seed=7)
    masks, gamma = select_by_ratio(
        inputs.fisher_forget, inputs.fisher_retain, params.eps, None, 0.2
    )
    after = _state(model)
    n_total = sum(v.numel() for v in original.values())
    assert info["n_reset"] == sum(int(m.sum()) for m in masks.values()) == round(0.2 * n_total)
    assert info["fraction_reset"] == pytest.approx(info["n_reset"] / n_total)
    assert info["gamma"] == pytest.approx(gamma)
    for k, m in masks.items():
        assert torch.equal(after[k][~m], original[k][~m]), k
        assert bool((after[k][m] != original[k][m]).all()), k
    assert all(
        torch.equal(v, trained.state_dict()[k]) for k, v in original.items()
    )  # input untouched


def test_fisher_diagonal_reset_values(trained: nn.Module, inputs: UnlearnInputs) -> None:
    """With zero fine-tuning epochs the selected weights hold exactly the reset value."""
    masks, _ = select_by_ratio(inputs.fisher_forget, inputs.fisher_retain, 1e-8, None, 0.3)
    zero, _ = fisher_diagonal_forgetting(
        _copy(trained),
        inputs,
        FisherDiagonalParams(top_fraction=0.3, reset="zero", epochs=0),
        seed=5,
    )
    fresh = _state(_factory(5))
    reinit, _ = fisher_diagonal_forgetting(
        _copy(trained),
        inputs,
        FisherDiagonalParams(top_fraction=0.3, reset="reinit", epochs=0),
        seed=5,
    )
    z, r, orig = _state(zero), _state(reinit), _state(trained)
    for k, m in masks.items():
        assert bool((z[k][m] == 0).all()), k
        assert torch.equal(r[k][m], fresh[k][m]), k
        assert torch.equal(z[k][~m], orig[k][~m]) and torch.equal(r[k][~m], orig[k][~m]), k


def test_fisher_diagonal_threshold_and_missing_stats(
    trained: nn.Module, inputs: UnlearnInputs
) -> None:
    params = FisherDiagonalParams(threshold=1e30, epochs=1)
    model, info = fisher_diagonal_forgetting(_copy(trained), inputs, params, seed=0)
    assert info["n_reset"] == 0 and info["gamma"] == 1e30
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in _state(model).items())
    bare = UnlearnInputs(
        inputs.forget_X, inputs.forget_y, inputs.retain_X, inputs.retain_y, _factory, inputs.train
    )
    with pytest.raises(ValueError, match="needs the forget and retain Fisher"):
        fisher_diagonal_forgetting(_copy(trained), bare, FisherDiagonalParams(), seed=0)


def test_fisher_diagonal_retain_sample_multiple(trained: nn.Module, inputs: UnlearnInputs) -> None:
    """k·|F| seeded retain points: the same as fine-tuning on exactly those rows (DMM's draw),
    not the same as fine-tuning on all of R; null keeps every retain point."""
    import dataclasses

    from pipeline_lib.attribution.matching import matching_retain_rows

    base = dict(top_fraction=0.2, epochs=2, lr=1e-2, batch_size=16)
    sub, info = fisher_diagonal_forgetting(
        _copy(trained), inputs, FisherDiagonalParams(**base, retain_sample_multiple=1.0), seed=3
    )
    rows = torch.from_numpy(matching_retain_rows(24, 72, 1.0, 3))
    assert info["n_finetune"] == len(rows) == 24
    only = dataclasses.replace(
        inputs, retain_X=inputs.retain_X[rows], retain_y=inputs.retain_y[rows]
    )
    want, _ = fisher_diagonal_forgetting(_copy(trained), only, FisherDiagonalParams(**base), seed=3)
    full, info_full = fisher_diagonal_forgetting(
        _copy(trained), inputs, FisherDiagonalParams(**base), seed=3
    )
    assert info_full["n_finetune"] == 72
    a, b, c = _state(sub), _state(want), _state(full)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # more than |R| points asked for: all of R
    _, big = fisher_diagonal_forgetting(
        _copy(trained), inputs, FisherDiagonalParams(**base, retain_sample_multiple=10.0), seed=3
    )
    assert big["n_finetune"] == 72
    # a floor on the sample: max(retain_sample_min, k·|F|) rows, DMM's draw at that size
    _, floor = fisher_diagonal_forgetting(
        _copy(trained),
        inputs,
        FisherDiagonalParams(**base, retain_sample_multiple=1.0, retain_sample_min=40),
        seed=3,
    )
    assert floor["n_finetune"] == 40 == len(matching_retain_rows(24, 72, 1.0, 3, minimum=40))
    assert len(matching_retain_rows(24, 72, 1.0, 3, minimum=10)) == 24  # k·|F| above the floor


def test_retrain_ignores_original_weights(trained: nn.Module, inputs: UnlearnInputs) -> None:
    retrain = get_method("retrain").fn
    a, _ = retrain(_copy(trained), inputs, RetrainParams(seed=2), 0)
    b, _ = retrain(_factory(99), inputs, RetrainParams(seed=2), 0)
    c, _ = retrain(_copy(trained), inputs, RetrainParams(seed=3), 0)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert all(not torch.equal(sa[k], v) for k, v in _state(trained).items())


def test_finetune_moves_all_weights(trained: nn.Module, inputs: UnlearnInputs) -> None:
    model, info = get_method("finetune").fn(
        _copy(trained), inputs, FinetuneParams(epochs=1, lr=1e-2), 0
    )
    assert info == {}
    assert all(not torch.equal(v, trained.state_dict()[k]) for k, v in _state(model).items())


# --------------------------------------------------------------------------- evaluation


def test_accuracy_on_constructed_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 2, 1])) == pytest.approx(75.0)
    assert accuracy(logits, torch.tensor([1, 0, 0, 1])) == 0.0
    assert accuracy(logits, torch.tensor([0, 1, 2, 0])) == 100.0


def test_confidence_and_loss() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
    y = torch.tensor([0, 2])
    np.testing.assert_allclose(confidence(logits, y), [0.7, 0.5], rtol=1e-6)
    np.testing.assert_allclose(per_sample_loss(logits, y), -np.log([0.7, 0.5]), rtol=1e-6)


def test_avg_gap_salun_check() -> None:
    method = {"UA": 2.85, "RA": 99.62, "TA": 93.93, "MIA_efficacy": 14.39, "loss_MIA_AUC": 0.9}
    oracle = {"UA": 5.24, "RA": 100.0, "TA": 94.26, "MIA_efficacy": 12.88, "loss_MIA_AUC": 0.5}
    gap = avg_gap(method, oracle)
    assert gap == pytest.approx(1.1525, abs=1e-9)
    assert round(gap, 2) == 1.15
    assert avg_gap(oracle, oracle) == 0.0


def test_mia_efficacy_separable() -> None:
    rng = np.random.default_rng(0)
    retain = rng.uniform(0.9, 1.0, 400)
    test = rng.uniform(0.1, 0.6, 300)
    like_test = rng.uniform(0.1, 0.6, 200)
    like_retain = rng.uniform(0.9, 1.0, 200)
    assert mia_efficacy(retain, test, like_test, c=3.0, seed=0) > 95.0
    assert mia_efficacy(retain, test, like_retain, c=3.0, seed=0) < 5.0


def test_loss_mia_auc() -> None:
    rng = np.random.default_rng(1)
    same_f, same_t = rng.exponential(1.0, 1000), rng.exponential(1.0, 1000)
    assert abs(loss_mia_auc(same_f, same_t, folds=5, seed=0) - 0.5) < 0.1
    low, high = rng.uniform(0.0, 0.1, 300), rng.uniform(1.0, 3.0, 300)
    assert loss_mia_auc(high, low, folds=5, seed=0) > 0.9
    assert np.isnan(loss_mia_auc(np.array([0.1]), low, folds=5, seed=0))


def test_evaluate_model_consistent(trained: nn.Module, inputs: UnlearnInputs) -> None:
    tX, ty = _data(40, 9)
    splits = EvalSplits(inputs.forget_X, inputs.forget_y, inputs.retain_X, inputs.retain_y, tX, ty)
    m = evaluate_model(trained, splits)
    assert m["UA"] == pytest.approx(100.0 - m["forget_acc"])
    assert m["forget_acc"] == pytest.approx(
        accuracy(predict_logits(trained, inputs.forget_X), inputs.forget_y)
    )
    assert m["TA"] == pytest.approx(accuracy(predict_logits(trained, tX), ty))
    assert 0.0 <= m["MIA_efficacy"] <= 100.0 and 0.0 <= m["loss_MIA_AUC"] <= 1.0


def _report() -> dict:
    base = {
        "forget_acc": 90.0,
        "UA": 10.0,
        "RA": 95.0,
        "TA": 90.0,
        "MIA_efficacy": 20.0,
        "loss_MIA_AUC": 0.6,
    }
    models = {
        "original": base,
        "unlearned": {**base, "forget_acc": 80.0, "UA": 20.0, "MIA_efficacy": 30.0},
        "oracle": {**base, "forget_acc": 70.0, "UA": 30.0, "MIA_efficacy": 40.0},
    }
    return build_report(models, unlearn_seconds=2.0, retrain_seconds=8.0, extra={"title": "t"})


def test_build_report_and_table() -> None:
    report = _report()
    assert report["models"]["oracle"]["avg_gap"] == 0.0
    assert report["models"]["original"]["avg_gap"] == pytest.approx(10.0)
    assert report["models"]["unlearned"]["avg_gap"] == pytest.approx(5.0)
    assert report["cost"]["unlearn_over_retrain"] == pytest.approx(0.25)
    assert report["title"] == "t"
    table = format_table(report)
    lines = table.splitlines()
    for name in ("original", "unlearned", "oracle"):
        assert any(line.startswith(name) for line in lines), name
    assert "ratio 0.250" in lines[-1]
    assert "avg_gap" in lines[0]


def test_plot_report_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "reports" / "eval.png"
    plot_report(_report(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.png"]


def test_select_top_fraction_eps_zero_ignores_dead_weights() -> None:
    forget = {"w": torch.tensor([0.0, 0.0, 1.0, 2.0])}
    retain = {"w": torch.tensor([0.0, 0.0, 1.0, 1.0])}
    masks, gamma = select_by_ratio(forget, retain, 0.0, None, 0.5)
    assert masks["w"].tolist() == [False, False, True, True]
    assert gamma == 1.0
