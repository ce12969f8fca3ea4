"""Baseline unlearning methods: NegGrad+, SCRUB, SalUn (algorithms.md, "Baselines").

The forgetting tests use a constructed problem where forgetting must show: a one-hidden-layer
MLP over-fitted (seed 0, 120 epochs, Adam lr 1e-2) on 160 structured retain points (data seed
0) plus 48 forget points with *random* labels (data seed 1, label seed 2). The forget labels
are pure memorisation, so a method that unlearns raises the forget loss far above the
original's (~0.02) while the retain points, which the structure explains, stay correct.
Each method runs with unlearning seeds 0, 1 and 2.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline_lib.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    UnlearnConfig,
    build_params,
    load_params,
)
from pipeline_lib.methods import (
    METHODS,
    UnlearnInputs,
    distill_kl,
    forget_saliency,
    get_method,
    random_other_labels,
    scrub_distill,
    top_fraction_mask,
)
from pipeline_lib.methods.neggrad_plus import NegGradPlusParams
from pipeline_lib.methods.salun import SalunParams
from pipeline_lib.methods.scrub import ScrubParams
from pipeline_lib.models.image import build_model
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
SHAPE = (1, 8, 8)
N_CLASSES = 4
CFG = ModelConfig(name="mlp", hidden=(32,))

#: Settings strong enough to act within a few dozen steps on the tiny problem.
TEST_PARAMS = {
    "neggrad_plus": NegGradPlusParams(epochs=10, lr=1e-2, batch_size=32, beta=0.9),
    "scrub": ScrubParams(epochs=10, max_steps=5, lr=1e-2, batch_size=16),
    "salun": SalunParams(saliency_fraction=0.5, epochs=10, lr=1e-2, batch_size=32),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _factory(seed: int) -> nn.Module:
    return build_model(CFG, SHAPE, N_CLASSES, seed)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    X = torch.rand((n, *SHAPE), generator=gen) * 0.5
    X[:, 0, 0, :] += nn.functional.one_hot(y, 8).float()
    return X, y


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _copy(model: nn.Module) -> nn.Module:
    clone = _factory(123)
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.fixture(scope="module")
def problem() -> tuple[nn.Module, UnlearnInputs]:
    retain_X, retain_y = _data(160, 0)
    forget_X, _ = _data(48, 1)
    forget_y = torch.randint(0, N_CLASSES, (48,), generator=torch.Generator().manual_seed(2))
    model = _factory(0)
    fit(
        model,
        torch.cat([retain_X, forget_X]),
        torch.cat([retain_y, forget_y]),
        FitSettings(epochs=120, batch_size=32, lr=1e-2),
        seed=0,
    )
    inputs = UnlearnInputs(forget_X, forget_y, retain_X, retain_y, _factory, TrainConfig())
    return model, inputs


def _forget_ce(model: nn.Module, inputs: UnlearnInputs) -> float:
    return float(
        nn.functional.cross_entropy(predict_logits(model, inputs.forget_X), inputs.forget_y)
    )


def _acc(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_logits(model, X).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- forgetting


def test_original_memorised_the_forget_set(problem) -> None:
    model, inputs = problem
    assert _acc(model, inputs.forget_X, inputs.forget_y) == 1.0
    assert _forget_ce(model, inputs) < 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(TEST_PARAMS))
def test_method_raises_forget_loss_and_keeps_retain(problem, name: str, seed: int) -> None:
    model, inputs = problem
    before = _state(model)
    out, info = get_method(name).fn(_copy(model), inputs, TEST_PARAMS[name], seed)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # on a copy
    assert _forget_ce(out, inputs) > 10 * _forget_ce(model, inputs)
    assert _acc(out, inputs.forget_X, inputs.forget_y) <= 0.75
    assert _acc(out, inputs.retain_X, inputs.retain_y) >= 0.9
    assert all(isinstance(v, int | float | str) for v in info.values())


@pytest.mark.parametrize("name", sorted(TEST_PARAMS))
def test_method_runs_with_defaults_and_is_seeded(problem, name: str) -> None:
    model, inputs = problem
    params = get_method(name).params_type()
    a, _ = get_method(name).fn(_copy(model), inputs, params, 5)
    b, _ = get_method(name).fn(_copy(model), inputs, params, 5)
    assert all(torch.equal(v, _state(b)[k]) for k, v in _state(a).items())
    assert torch.isfinite(predict_logits(a, inputs.retain_X)).all()
    assert not all(torch.equal(v, _state(model)[k]) for k, v in _state(a).items())


# --------------------------------------------------------------------------- SalUn


def test_salun_moves_only_masked_weights(problem) -> None:
    model, inputs = problem
    params = SalunParams(saliency_fraction=0.3, epochs=3, lr=1e-2, batch_size=32)
    masks, _ = top_fraction_mask(
        forget_saliency(model, inputs.forget_X, inputs.forget_y, 32, torch.device("cpu")),
        params.saliency_fraction,
    )
    n_params = sum(p.numel() for p in model.parameters())
    n_masked = sum(int(m.sum()) for m in masks.values())
    assert n_masked == round(0.3 * n_params)
    out, info = get_method("salun").fn(_copy(model), inputs, params, 0)
    assert info["n_masked"] == n_masked
    before, after = _state(model), _state(out)
    for k, m in masks.items():
        assert torch.equal(after[k][~m], before[k][~m]), k  # bit-identical
    assert any(not torch.equal(after[k][m], before[k][m]) for k, m in masks.items())


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_top_fraction_mask_exact_count_even_with_ties(fraction: float) -> None:
    scores = {"a": torch.zeros(7, 3), "b": torch.ones(11), "c": torch.zeros(5)}
    masks, _ = top_fraction_mask(scores, fraction)
    assert {k: m.shape for k, m in masks.items()} == {k: s.shape for k, s in scores.items()}
    assert sum(int(m.sum()) for m in masks.values()) == max(1, round(fraction * 37))


def test_forget_saliency_is_abs_of_summed_forget_gradient(problem) -> None:
    model, inputs = problem
    sal = forget_saliency(model, inputs.forget_X, inputs.forget_y, 7, torch.device("cpu"))
    ref = _copy(model)
    ref.zero_grad()
    nn.functional.cross_entropy(ref(inputs.forget_X), inputs.forget_y, reduction="sum").backward()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(sal[k], p.grad.abs(), rtol=1e-4, atol=1e-6)


def test_random_other_labels_differ_from_true_and_are_seeded() -> None:
    y = torch.arange(400) % N_CLASSES
    r = random_other_labels(y, N_CLASSES, 3)
    assert not (r == y).any()
    assert ((r >= 0) & (r < N_CLASSES)).all()
    assert torch.equal(r, random_other_labels(y, N_CLASSES, 3))
    for c in range(N_CLASSES):  # every other class is reachable
        assert set(r[y == c].tolist()) == set(range(N_CLASSES)) - {c}


# --------------------------------------------------------------------------- SCRUB


def test_scrub_leaves_teacher_unchanged(problem) -> None:
    model, inputs = problem
    teacher = _copy(model).requires_grad_(False)
    student = _copy(model)
    before = _state(teacher)
    scrub_distill(student, teacher, inputs, TEST_PARAMS["scrub"], 0)
    assert all(torch.equal(v, before[k]) for k, v in _state(teacher).items())
    assert not all(torch.equal(v, before[k]) for k, v in _state(student).items())


def test_distill_kl_is_t2_scaled_kl_teacher_to_student() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    p_t, p_s = torch.softmax(t / 4, 1), torch.softmax(s / 4, 1)
    expected = 16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(distill_kl(s, t, 4.0), expected)
    assert float(distill_kl(t, t, 4.0)) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- registry, config


def test_registry_lists_new_methods() -> None:
    assert {"neggrad_plus", "scrub", "salun"} <= set(METHODS)
    for name, tp in [("neggrad_plus", NegGradPlusParams), ("scrub", ScrubParams)]:
        assert get_method(name).params_type is tp
    assert get_method("salun").params_type is SalunParams
    with pytest.raises(ConfigError) as info:
        get_method("nope")
    assert "neggrad_plus" in str(info.value) and "salun" in str(info.value)
    assert "scrub" in str(info.value)


def test_params_yaml_sections_match_defaults() -> None:
    params = load_params(PARAMS_YAML)
    raw = yaml.safe_load(PARAMS_YAML.read_text())["unlearn"]
    for name in ("neggrad_plus", "scrub", "salun"):
        assert set(raw[name]) == set(vars(getattr(UnlearnConfig(), name)))
        assert getattr(params.unlearn, name) == getattr(UnlearnConfig(), name)
        params_b = load_params(PARAMS_YAML, {"unlearn.method": name})
        assert params_b.unlearn.method_params() == getattr(UnlearnConfig(), name)


def test_unknown_key_under_scrub_names_it() -> None:
    with pytest.raises(ConfigError, match=r"unknown key unlearn\.scrub\.temprature") as info:
        build_params({}, {"unlearn.scrub.temprature": 2.0})
    assert "temperature" in str(info.value)  # valid keys listed


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("unlearn.neggrad_plus.beta", 1.5, "must be in [0, 1]"),
        ("unlearn.neggrad_plus.lr", 0.0, "must be > 0"),
        ("unlearn.neggrad_plus.batch_size", 0, "must be > 0"),
        ("unlearn.scrub.temperature", 0.0, "must be > 0"),
        ("unlearn.scrub.max_steps", -1, "must be >= 0"),
        ("unlearn.scrub.gamma_kl", -0.1, "must be >= 0"),
        ("unlearn.scrub.alpha_ce", -1.0, "must be >= 0"),
        ("unlearn.scrub.epochs", -1, "must be >= 0"),
        ("unlearn.salun.saliency_fraction", 0.0, "must be in (0, 1]"),
        ("unlearn.salun.saliency_fraction", 1.5, "must be in (0, 1]"),
        ("unlearn.salun.lr", -1e-3, "must be > 0"),
        ("unlearn.salun.epochs", -2, "must be >= 0"),
    ],
)
def test_out_of_range_values_rejected(key: str, value: float, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key}: {expected}")):
        build_params({}, {key: value})
