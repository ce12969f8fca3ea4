"""Class forgetting on real data (scikit-learn's digits, class 3 forgotten): the one-step
methods on the shared Fisher statistics (SSD, Fisher forgetting) and their exact updates."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from sklearn.datasets import load_digits

from pipeline_lib.config import ModelConfig, TrainConfig, replace
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.methods.fisher_baselines import FisherForgettingParams, SsdParams, ssd_dampen
from pipeline_lib.methods.svd_projection import SvdProjectionParams
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET_CLASS = 3
SHAPE = (1, 8, 8)


def accuracy(model, X, y) -> float:
    return float((predict_logits(model, X).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, *SHAPE)
    y = torch.tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    tr, te = order[:1400], order[1400:]
    return X[tr], y[tr], X[te], y[te]


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    Xtr, ytr, _, _ = digits
    cfg = ModelConfig(name="mlp", hidden=(64,))
    model = build_model(cfg, SHAPE, 10, seed=0)
    fit(model, Xtr, ytr, FitSettings(15, 64, 3e-3), seed=0)
    return cfg, model


def make_inputs(digits, cfg, model, fisher: bool = True, **extra) -> UnlearnInputs:
    Xtr, ytr, _, _ = digits
    f = ytr == FORGET_CLASS
    fX, fy, rX, ry = Xtr[f], ytr[f], Xtr[~f], ytr[~f]
    kw = {}
    if fisher:
        kw = {
            "fisher_forget": fisher_diagonal(model, fX, fy),
            "fisher_retain": fisher_diagonal(model, rX, ry),
        }
    return UnlearnInputs(
        fX,
        fy,
        rX,
        ry,
        model_factory=lambda s: build_model(cfg, SHAPE, 10, s),
        train=TrainConfig(),
        **kw,
        **extra,
    )


def split_acc(digits, model) -> tuple[float, float]:
    _, _, Xte, yte = digits
    f = yte == FORGET_CLASS
    return accuracy(model, Xte[f], yte[f]), accuracy(model, Xte[~f], yte[~f])


def test_ssd_update_is_exact():
    model = torch.nn.Linear(3, 2)
    before = copy.deepcopy(model)
    i_f = {"weight": torch.tensor([[1.0, 0.0, 5.0], [30.0, 2.0, 0.0]]), "bias": torch.zeros(2)}
    i_d = {"weight": torch.tensor([[1.0, 1.0, 0.4], [2.0, 0.1, 0.0]]), "bias": torch.ones(2)}
    n, total = ssd_dampen(model, i_f, i_d, alpha=10.0, lam=1.0)
    # selected: 5 > 10*0.4 and 30 > 10*2 and 2 > 10*0.1; factors 0.4/5, 2/30, 0.1/2
    assert (n, total) == (3, 8)
    factor = torch.tensor([[1.0, 1.0, 0.08], [2 / 30, 0.05, 1.0]])
    torch.testing.assert_close(model.weight, before.weight * factor)
    torch.testing.assert_close(model.bias, before.bias)


def test_ssd_forgets_a_class(digits, trained):
    cfg, model = trained
    f0, r0 = split_acc(digits, model)
    assert f0 > 0.8 and r0 > 0.9
    out, info = get_method("ssd").fn(
        copy.deepcopy(model), make_inputs(digits, cfg, model), SsdParams(), 0
    )
    f1, r1 = split_acc(digits, out)
    assert info["n_dampened"] > 0
    assert f1 < 0.2 and r1 > r0 - 0.1, (f1, r1)


def test_fisher_forgetting_noise_has_the_fisher_variance(digits, trained):
    cfg, model = trained
    inputs = make_inputs(digits, cfg, model)
    p = FisherForgettingParams(alpha=1e-6, eps=1e-8, var_clamp=1e3)
    a, _ = get_method("fisher_forgetting").fn(copy.deepcopy(model), inputs, p, 7)
    b, _ = get_method("fisher_forgetting").fn(copy.deepcopy(model), inputs, p, 7)
    z = []
    for (k, p0), p1, p2 in zip(
        model.named_parameters(), a.parameters(), b.parameters(), strict=True
    ):
        torch.testing.assert_close(p1, p2)  # seeded
        var = 1e-6 * (1.0 / (inputs.fisher_retain[k].double() + 1e-8)).clamp(max=1e3)
        z.append(((p1 - p0).detach().double() / var.sqrt()).flatten())
    z = torch.cat(z)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05
    with pytest.raises(ValueError, match="Fisher diagonals"):
        get_method("fisher_forgetting").fn(
            copy.deepcopy(model), make_inputs(digits, cfg, model, fisher=False), p, 0
        )


@pytest.fixture(scope="module")
def trained_cnn(digits, one_thread):
    Xtr, ytr, _, _ = digits
    cfg = ModelConfig(name="cnn", channels=(8, 16))
    model = build_model(cfg, SHAPE, 10, seed=0)
    fit(model, Xtr, ytr, FitSettings(15, 64, 3e-3), seed=0)
    return cfg, model


@pytest.mark.parametrize("which", ["trained", "trained_cnn"])
def test_svd_projection_forgets_the_class_without_gradients(digits, which, request):
    cfg, model = request.getfixturevalue(which)
    f0, r0 = split_acc(digits, model)
    inputs = make_inputs(digits, cfg, model, fisher=False)
    params = SvdProjectionParams(alpha_r=100, alpha_f=3, retain_per_class=30, forget_per_class=30)
    copy_ = copy.deepcopy(model)
    with torch.autograd.set_grad_enabled(False):  # gradient-free: works with autograd off
        out, info = get_method("svd_projection").fn(copy_, inputs, params, 0)
    f1, r1 = split_acc(digits, out)
    assert info["n_retain_samples"] == 9 * 30 and info["n_forget_samples"] == 30
    assert f1 < 0.1 and r1 > r0 - 0.06, (f0, r0, f1, r1)
    # every projected weight moved, biases did not
    for (k, a), b in zip(model.named_parameters(), out.parameters(), strict=True):
        assert torch.equal(a, b) == k.endswith("bias"), k


def test_svd_projection_alpha_search_picks_the_best_pair_on_the_samples_read(digits, trained):
    """With α grids, every pair is scored on the samples the method read (retain accuracy −
    forget accuracy) and the best is kept: the result equals a plain run at the chosen α."""
    from pipeline_lib.evaluation.metrics import accuracy
    from pipeline_lib.methods.svd_projection import per_class_sample

    def _accuracy(model, X, y, batch_size):
        return accuracy(predict_logits(model, X, batch_size), y)

    cfg, model = trained
    inputs = make_inputs(digits, cfg, model, fisher=False)
    base = SvdProjectionParams(retain_per_class=20, forget_per_class=20)
    grid = replace(base, alpha_r_grid=(10.0, 1000.0), alpha_f_grid=(1.0, 3.0, 30.0))
    out, info = get_method("svd_projection").fn(copy.deepcopy(model), inputs, grid, 0)
    assert info["alpha_candidates"] == 6
    gen = torch.Generator().manual_seed(0)
    r_rows = per_class_sample(inputs.retain_y, 20, gen)
    f_rows = per_class_sample(inputs.forget_y, 20, gen)
    scores = {}
    for a_r in grid.alpha_r_grid:
        for a_f in grid.alpha_f_grid:
            p = replace(base, alpha_r=a_r, alpha_f=a_f)
            m, _ = get_method("svd_projection").fn(copy.deepcopy(model), inputs, p, 0)
            scores[(a_r, a_f)] = _accuracy(
                m, inputs.retain_X[r_rows], inputs.retain_y[r_rows], 256
            ) - _accuracy(m, inputs.forget_X[f_rows], inputs.forget_y[f_rows], 256)
            if (a_r, a_f) == (info["alpha_r"], info["alpha_f"]):
                chosen = m
    assert info["alpha_search_score"] == pytest.approx(max(scores.values()))
    assert scores[(info["alpha_r"], info["alpha_f"])] == max(scores.values())
    assert len(set(scores.values())) > 1  # the grid matters on this model
    for a, b in zip(out.parameters(), chosen.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_projection_matrix_matches_the_formula():
    from pipeline_lib.methods.svd_projection import class_projection, scaled_projector

    gen = torch.Generator().manual_seed(0)
    A_r = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    A_f = torch.randn(20, 6, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.tensor([5.0, 1, 0.1, 0, 0, 0], dtype=torch.float64)
    )
    _, s, vh = torch.linalg.svd(A_r, full_matrices=False)
    sig = s**2 / (s**2).sum()
    lam = 100 * sig / (99 * sig + 1)
    torch.testing.assert_close(scaled_projector(A_r.T @ A_r, 100.0), vh.T @ torch.diag(lam) @ vh)
    m_r, m_f = scaled_projector(A_r.T @ A_r, 100.0), scaled_projector(A_f.T @ A_f, 3.0)
    torch.testing.assert_close(
        class_projection(A_r.T @ A_r, A_f.T @ A_f, 100.0, 3.0),
        torch.eye(6, dtype=torch.float64) - (m_f - m_f @ m_r),
    )
    # α → ∞ saturates λ at 1 on the span: M is the orthogonal projector onto it
    p = scaled_projector(A_f.T @ A_f, 1e12)
    torch.testing.assert_close(p @ p, p, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- mnemonic codes


def test_code_mixer_swaps_the_expected_fraction():
    from pipeline_lib.methods.mnemonic import CodeMixer, mnemonic_codes

    codes = mnemonic_codes(SHAPE, 10, 0)
    torch.testing.assert_close(codes, mnemonic_codes(SHAPE, 10, 0))  # a pure function of the seed
    assert float(codes.min()) >= 0 and float(codes.max()) < 1
    y = torch.arange(4000) % 10
    xb = torch.full((4000, *SHAPE), -1.0)
    out, out_y = CodeMixer(codes, 0.1, 0)(xb, y)
    swapped = (out != -1).flatten(1).all(1)
    assert torch.equal(out_y, y) and abs(float(swapped.float().mean()) - 0.1) < 0.02
    torch.testing.assert_close(out[swapped], codes[y[swapped]])
    assert torch.all(xb == -1)  # the caller's batch is not modified


def test_mnemonic_code_forgets_from_the_codes_alone(digits):
    from pipeline_lib.methods.mnemonic import CodeMixer, MnemonicCodeParams, mnemonic_codes

    Xtr, ytr, _, _ = digits
    cfg = ModelConfig(name="cnn", channels=(8, 16))
    codes = mnemonic_codes(SHAPE, 10, 0)
    model = build_model(cfg, SHAPE, 10, seed=0)
    fit(model, Xtr, ytr, FitSettings(15, 64, 3e-3), 0, batch_transform=CodeMixer(codes, 0.1, 0))
    f0, r0 = split_acc(digits, model)
    empty = (torch.empty((0, *SHAPE)), torch.empty(0, dtype=torch.int64))
    inputs = UnlearnInputs(
        *empty,
        *empty,
        model_factory=lambda s: build_model(cfg, SHAPE, 10, s),
        train=TrainConfig(mnemonic_t_mix=0.1),
        forget_classes=(FORGET_CLASS,),
        mnemonic_codes=codes,
    )
    out, info = get_method("mnemonic_code").fn(
        copy.deepcopy(model), inputs, MnemonicCodeParams(), 0
    )
    f1, r1 = split_acc(digits, out)
    assert f0 > 0.8 and f1 < 0.05 and r1 > r0 - 0.03, (f0, r0, f1, r1)
    assert info["code_score"] == 2.0  # forget code misclassified, every other code right
    with pytest.raises(ValueError, match="must list classes"):
        get_method("mnemonic_code").fn(
            copy.deepcopy(model),
            dataclasses.replace(inputs, forget_classes=()),
            MnemonicCodeParams(),
            0,
        )
    with pytest.raises(ValueError, match="mnemonic_t_mix"):
        get_method("mnemonic_code").fn(
            copy.deepcopy(model),
            dataclasses.replace(inputs, mnemonic_codes=None),
            MnemonicCodeParams(),
            0,
        )


def test_pipeline_hands_mnemonic_code_no_training_data(tmp_path):
    """The step that builds a method's inputs from a class request gives mnemonic_code zero
    forget and retain rows (and the codes and classes), while a data method gets the data."""
    from pipeline_lib.config import DataConfig
    from pipeline_lib.data.images import load_prepared, prepare_dataset
    from pipeline_lib.data.requests import extract_forget_set, parse_request, write_manifests
    from pipeline_lib.modalities.image import load_splits, unlearn_inputs

    prepare_dataset(DataConfig(max_train=200, max_test=50), tmp_path / "prep")
    data = load_prepared(tmp_path / "prep")
    req = parse_request({"request_id": "r", "reason": "x", "forget": {"classes": [3, 7]}})
    write_manifests(tmp_path / "man", req, *extract_forget_set(req, data), data.meta)
    splits = load_splits(tmp_path / "prep", tmp_path / "man")
    train = TrainConfig(mnemonic_t_mix=0.1, mnemonic_seed=4)
    cfg = ModelConfig(name="mlp", hidden=(8,))
    dev = torch.device("cpu")
    inputs = unlearn_inputs(splits, get_method("mnemonic_code"), cfg, train, None, dev)
    for t in (inputs.forget_X, inputs.forget_y, inputs.retain_X, inputs.retain_y):
        assert t.shape[0] == 0
    assert inputs.forget_classes == (3, 7)
    assert inputs.mnemonic_codes is not None and inputs.mnemonic_codes.shape == (10, *data.shape)
    data_inputs = unlearn_inputs(splits, get_method("svd_projection"), cfg, train, None, dev)
    assert len(data_inputs.forget_y) == len(splits.forget[1]) > 0
    assert set(data_inputs.forget_y.tolist()) == {3, 7}
