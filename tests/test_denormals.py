"""The trainers run their CPU loops with denormal floats flushed to zero
(``pipeline_lib.denormals.flush_denormals``), and put the caller's mode back.

How the tests see the mode from outside: one feature of X is a float32 denormal (1e-39). One
Adam step with a huge learning rate moves the weights that read it only if the gradient
``g · 1e-39`` is not flushed: step 1's update is lr·m̂/(√v̂ + ε) with v̂ = grad² underflowing
to 0, so lr = 1e30 turns a ~1e-40 gradient into a ~1e-2 move. Flushed, the gradient is 0 and
those weights keep their initial value exactly.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline_lib.attribution.matching import MatchTargets
from pipeline_lib.config import ModelConfig, TrainConfig
from pipeline_lib.denormals import flush_denormals, flushing_denormals
from pipeline_lib.methods import METHODS, UnlearnInputs
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.ensemble import train_ensemble
from pipeline_lib.training.fit import FitSettings, fit

SHAPE, C, N, K = (6,), 3, 16, 4
COL = 2  # the feature that holds a denormal
MLP = ModelConfig(name="mlp", hidden=(8,))
ONE_STEP = FitSettings(epochs=1, batch_size=64, lr=1e30, optimizer="adam")


@pytest.fixture(autouse=True)
def _mode_off():
    """Every test starts and ends with torch's default (no flushing) on this thread."""
    torch.set_flush_denormal(False)
    yield
    assert not flushing_denormals(), "a test left this thread flushing denormals"


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    X = torch.rand(N, *SHAPE, generator=g) + 0.5
    X[:, COL] = 1e-39
    assert 0 < float(X[0, COL]) < torch.finfo(torch.float32).tiny  # a denormal, not 0
    return X, torch.randint(0, C, (N,), generator=g)


def _flag(flush: bool | None) -> dict[str, bool]:
    """The trainer's keyword: none (its default) or the given value."""
    return {} if flush is None else {"flush_denormal": flush}


def _assert_denormal_column(w: torch.Tensor, w0: torch.Tensor, flushed: bool) -> None:
    """First-layer weights (..., hidden, features) after one step against their initial
    values. A hidden unit the batch never switches on gets no gradient in either mode, so
    only the units whose normal feature COL - 1 moved are alive."""
    assert torch.isfinite(w).all()
    alive = w[..., COL - 1] != w0[..., COL - 1]
    assert alive.sum() >= 2
    moved = w[..., COL] != w0[..., COL]
    if flushed:
        assert not moved.any()
    else:  # a ~1e-2 move for (nearly) every live unit, none for a dead one
        assert moved.sum() >= alive.sum() // 2 and not (moved & ~alive).any()
        assert (w - w0)[..., COL][moved].abs().min() > 1e-5


def test_flush_denormals_sets_and_restores_the_threads_mode():
    assert not flushing_denormals()
    with flush_denormals():
        assert flushing_denormals()
        with flush_denormals(False):
            assert not flushing_denormals()
        assert flushing_denormals()
        with flush_denormals():
            assert flushing_denormals()
        assert flushing_denormals()  # an inner block does not turn off what an outer one set
    assert not flushing_denormals()
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("the mode is restored on the way out of an error too")
    assert not flushing_denormals()


def test_flush_denormals_is_per_thread_and_inherited_by_threads_started_inside():
    seen = {}

    def probe(name: str) -> None:
        seen[name] = flushing_denormals()

    with flush_denormals():
        t = threading.Thread(target=probe, args=("started inside",))
        t.start()
        t.join()
    outside = threading.Thread(target=probe, args=("started after",))
    outside.start()
    outside.join()
    assert seen == {"started inside": True, "started after": False}


@pytest.mark.parametrize("flush", [None, False], ids=["default", "off"])
def test_fit_trains_flushed_by_default(flush):
    X, y = _data()
    seen = []

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(flushing_denormals())
        return torch.nn.functional.cross_entropy(logits, target)

    model = build_model(MLP, SHAPE, C, 7)
    w0 = model.net[1].weight.detach().clone()
    fit(model, X, y, ONE_STEP, 7, loss_fn=loss, **_flag(flush))
    assert seen == [flush is None]
    _assert_denormal_column(model.net[1].weight.detach(), w0, flushed=flush is None)


@pytest.mark.parametrize(
    "cpu_parallel,block_mib", [("ops", 0), ("models", 1e-3)], ids=["one-loop", "block-threads"]
)
@pytest.mark.parametrize("flush", [None, False], ids=["default", "off"])
def test_train_ensemble_trains_flushed_by_default(cpu_parallel, block_mib, flush):
    """Both CPU layouts: one loop on the caller's thread, and one block per model on worker
    threads (each sets its own thread's mode)."""
    X, y = _data()
    masks = torch.ones(K, N, dtype=torch.bool)
    seeds = list(range(K))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stacked = train_ensemble(
            MLP, SHAPE, C, X, y, masks, seeds, ONE_STEP, cpu_parallel=cpu_parallel,
            cpu_block_mib=block_mib, **_flag(flush),
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    w0 = torch.stack([build_model(MLP, SHAPE, C, s).net[1].weight.detach() for s in seeds])
    _assert_denormal_column(stacked["net.1.weight"], w0, flushed=flush is None)


# --------------------------------------------------------------------------- the methods


def _method_inputs(targets: str) -> UnlearnInputs:
    g = torch.Generator().manual_seed(3)
    X = torch.rand(40, *SHAPE, generator=g)
    y = torch.arange(40) % C
    fX, fy, rX, ry = X[:8], y[:8], X[8:], y[8:]
    T = torch.randn(40, C, generator=g)
    model = _factory(0)
    return UnlearnInputs(
        forget_X=fX, forget_y=fy, retain_X=rX, retain_y=ry, model_factory=_factory,
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, device="cpu"),
        fisher_forget=fisher_diagonal(model, fX, fy), fisher_retain=fisher_diagonal(model, rX, ry),
        match=MatchTargets(X, T, 8, targets or "oracles"),
    )  # fmt: skip


def _factory(seed: int) -> nn.Module:
    return build_model(MLP, SHAPE, C, seed)


def test_every_method_trains_flushed():
    """Every optimizer step of every unlearning method (its own Adam loop, or fit's) runs
    with denormals flushed; seen by torch.optim's global step hook. The class-only methods
    (mnemonic_code, svd_projection: one closed-form step each, no optimizer) are left out."""
    unflushed: dict[str, int] = {}
    stepping = set()
    seen: list[bool] = []
    hook = register_optimizer_step_pre_hook(lambda *_: seen.append(flushing_denormals()))
    try:
        for method in METHODS.values():
            if method.class_only:
                continue
            seen.clear()
            method.fn(_factory(0), _method_inputs(method.needs_targets), method.params_type(), 0)
            if seen:
                stepping.add(method.name)
            if not all(seen):
                unflushed[method.name] = seen.count(False)
    finally:
        hook.remove()
    assert unflushed == {}
    # the methods with a loop of their own, and some through fit
    assert {"neggrad_plus", "scrub", "dmm", "oracle_matching", "finetune", "salun"} <= stepping
