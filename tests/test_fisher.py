"""The vectorised per-sample Fisher diagonal against the Python-loop reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import (
    KINDS,
    PER_SAMPLE_KINDS,
    fisher_diagonal,
    fisher_diagonal_reference,
    fisher_diagonal_sum,
    fisher_targets,
    total_entries,
)

N_CLASSES = 10
SHAPE = (1, 8, 8)
MODELS = {
    "mlp": ModelConfig(name="mlp", hidden=(16, 12)),
    "cnn": ModelConfig(name="cnn", channels=(4, 6)),
}
# Required: agreement to 1e-6; the entries are ~1e-8..1e-1 and float64 agrees to ~1e-16,
# so a much tighter tolerance keeps the check meaningful for the small entries too.
TOL = {"atol": 1e-12, "rtol": 1e-9}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, seed: int = 0) -> nn.Module:
    return build_model(MODELS[name], SHAPE, N_CLASSES, seed).double()


def _data(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand((n, *SHAPE), generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    return X, y


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **(tol or TOL))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_vectorised_matches_reference(arch: str, kind: str) -> None:
    model = _model(arch)
    X, y = _data()
    fast = fisher_diagonal(model, X, y, kind=kind, batch_size=8, seed=3)
    ref = fisher_diagonal_reference(model, X, y, kind=kind, seed=3, batch_size=8)
    assert all(v.dtype == torch.float64 for v in fast.values())
    assert fast.keys() == dict(model.named_parameters()).keys()
    _assert_same(fast, ref)
    # Non-trivial: every parameter tensor has some signal, and all entries are >= 0.
    for k, v in fast.items():
        assert bool((v >= 0).all()), k
        assert float(v.sum()) > 0, k


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_true_expected_matches_closed_form_last_layer(arch: str) -> None:
    """Independent check (besides the reference): for the last linear layer's bias, the
    per-sample gradient of log p_c is (onehot_c - p), so the true Fisher diagonal is
    E_x Σ_c p_c (δ_cj - p_j)² = E_x p_j (1 - p_j)."""
    model = _model(arch)
    X, y = _data()
    last_bias = [k for k, _ in model.named_parameters()][-1]
    with torch.no_grad():
        p = model(X).softmax(-1)
    expected = (p * (1 - p)).mean(0)
    torch.testing.assert_close(fisher_diagonal(model, X, y)[last_bias], expected, **TOL)
    # And for the empirical kind: E_x (δ_{y j} - p_j)².
    onehot = nn.functional.one_hot(y, N_CLASSES).double()
    emp = ((onehot - p) ** 2).mean(0)
    torch.testing.assert_close(
        fisher_diagonal(model, X, y, kind="empirical")[last_bias], emp, **TOL
    )


@pytest.mark.parametrize("kind", PER_SAMPLE_KINDS)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_batch_size_does_not_matter(arch: str, kind: str) -> None:
    model = _model(arch)
    X, y = _data()
    results = [fisher_diagonal(model, X, y, kind=kind, batch_size=b, seed=1) for b in (1, 7, 64)]
    for other in results[1:]:
        _assert_same(results[0], other, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["true_expected", "empirical"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_sum_over_shards_equals_whole(arch: str, kind: str) -> None:
    model = _model(arch)
    X, y = _data(n=13)
    whole, n = fisher_diagonal_sum(model, X, y, kind=kind, batch_size=8)
    first, n1 = fisher_diagonal_sum(model, X[:5], y[:5], kind=kind, batch_size=8)
    second, n2 = fisher_diagonal_sum(model, X[5:], y[5:], kind=kind, batch_size=8)
    assert (n, n1, n2) == (13, 5, 8)
    added = {k: first[k] + second[k] for k in first}
    _assert_same(added, whole, atol=1e-12, rtol=1e-10)
    mean = fisher_diagonal(model, X, y, kind=kind, batch_size=8)
    _assert_same({k: v / n for k, v in whole.items()}, mean, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_kind_matters(arch: str) -> None:
    model = _model(arch)
    X, y = _data()
    true = fisher_diagonal(model, X, y, kind="true_expected")
    emp = fisher_diagonal(model, X, y, kind="empirical")
    sampled = fisher_diagonal(model, X, y, kind="true_sampled", seed=0)
    for other in (emp, sampled):
        diff = max(float((true[k] - other[k]).abs().max()) for k in true)
        scale = max(float(true[k].abs().max()) for k in true)
        assert diff > 1e-3 * scale


def test_true_sampled_is_seeded() -> None:
    model = _model("mlp")
    X, y = _data()
    a = fisher_diagonal(model, X, y, kind="true_sampled", seed=5)
    b = fisher_diagonal(model, X, y, kind="true_sampled", seed=5)
    c = fisher_diagonal(model, X, y, kind="true_sampled", seed=6)
    _assert_same(a, b, atol=0.0, rtol=0.0)
    assert any(not torch.allclose(a[k], c[k]) for k in a)
    t1, _ = fisher_targets(model, X, y, "true_sampled", 5)
    t2, _ = fisher_targets(model, X, y, "true_sampled", 6)
    assert t1 is not None and t1.shape == (20,) and not torch.equal(t1, t2)


def test_true_sampled_converges_to_true_expected() -> None:
    """Monte-Carlo true Fisher over many copies of the same inputs ≈ the exact expectation."""
    model = _model("mlp")
    X, y = _data(n=4)
    Xr, yr = X.repeat(500, 1, 1, 1), y.repeat(500)
    sampled = fisher_diagonal(model, Xr, yr, kind="true_sampled", batch_size=2000, seed=0)
    exact = fisher_diagonal(model, X, y, kind="true_expected")
    num = sum(float((sampled[k] - exact[k]).abs().sum()) for k in exact)
    den = sum(float(exact[k].abs().sum()) for k in exact)
    assert num / den < 0.15


def test_unknown_kind_lists_kinds() -> None:
    model = _model("mlp")
    X, y = _data(n=3)
    for fn in (fisher_diagonal, fisher_diagonal_reference):
        with pytest.raises(
            ValueError,
            match="'fisher' unknown; valid: true_expected, true_sampled, empirical, batch_squared",
        ):
            fn(model, X, y, kind="fisher")


def test_empty_set_and_helpers() -> None:
    model = _model("mlp")
    with pytest.raises(ValueError, match="empty sample set"):
        fisher_diagonal(
            model, torch.empty((0, *SHAPE), dtype=torch.float64), torch.empty(0, dtype=torch.long)
        )
    stats = fisher_diagonal(model, *_data(n=2))
    assert total_entries(stats) == sum(p.numel() for p in model.parameters())


def test_float32_model_leaves_weights_and_grads_alone() -> None:
    model = build_model(MODELS["cnn"], SHAPE, N_CLASSES, 0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    X, y = _data(n=6)
    stats = fisher_diagonal(model, X.float(), y)
    assert all(v.dtype == torch.float32 for v in stats.values())
    fisher_diagonal_reference(model, X.float(), y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["true_expected", "empirical"])
def test_fisher_sum_of_empty_shard_is_zero(kind: str) -> None:
    model = _model("mlp")
    X, y = _data(n=0)
    sums, n = fisher_diagonal_sum(model, X, y, kind=kind)
    assert n == 0 and all(float(v.abs().sum()) == 0.0 for v in sums.values())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_batch_squared_is_ssd_importance(arch: str) -> None:
    """``batch_squared`` (SSD's reference importance): with batch_size=1 the squared gradient
    of each one-sample batch is that sample's empirical per-sample term, so it equals the
    empirical Fisher; with larger batches the gradients of a batch's samples are averaged
    before squaring (they partly cancel), so it differs and is smaller on mixed batches; it is
    the mean over equal batches of (∇ batch-mean CE)², which a hand-written loop reproduces."""
    model = _model(arch)
    X, y = _data(n=24)
    emp = fisher_diagonal(model, X, y, kind="empirical")
    one = fisher_diagonal(model, X, y, kind="batch_squared", batch_size=1)
    _assert_same(one, emp)
    eight = fisher_diagonal(model, X, y, kind="batch_squared", batch_size=8)
    total_emp = sum(float(v.sum()) for v in emp.values())
    total_eight = sum(float(v.sum()) for v in eight.values())
    assert total_eight < 0.9 * total_emp
    by_hand = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for b in range(3):  # three equal batches: SSD's Σ_b g_b² / n_batches
        model.zero_grad()
        nn.functional.cross_entropy(model(X[8 * b : 8 * b + 8]), y[8 * b : 8 * b + 8]).backward()
        for k, p in model.named_parameters():
            by_hand[k] += p.grad.square() / 3
    model.zero_grad(set_to_none=True)
    _assert_same(eight, by_hand)
    # not additive over samples: the sum of two halves' sums is not the whole's
    whole, _ = fisher_diagonal_sum(model, X, y, kind="batch_squared", batch_size=12)
    a, _ = fisher_diagonal_sum(model, X[:12], y[:12], kind="batch_squared", batch_size=8)
    b2, _ = fisher_diagonal_sum(model, X[12:], y[12:], kind="batch_squared", batch_size=8)
    assert any(not torch.allclose(whole[k], a[k] + b2[k]) for k in whole)
