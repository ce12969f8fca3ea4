"""The vectorised ensemble trainer against its slow reference: each model trained alone by fit.

Float64 throughout the equivalence tests so that rounding cannot hide a real difference:
after 3 epochs of Adam/SGD the largest parameter difference is ~1e-16; asserted at
atol 1e-12, rtol 0.
"""

from __future__ import annotations

import threading

import pytest
import torch

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.training import ensemble
from pipeline_lib.training.ensemble import (
    ensemble_logits,
    train_ensemble,
    train_ensemble_reference,
    train_step_flops,
    unstack,
)
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

SHAPE = (1, 8, 8)
N, C, K, PER_MODEL = 60, 10, 3, 30
SEEDS = [11, 5, 23]
ATOL = 1e-12

MLP = ModelConfig(name="mlp", hidden=(16, 16))
CNN = ModelConfig(name="cnn", channels=(4, 8))
# batch 8 over 30 samples: 3 full batches and a partial one of 6 in every epoch
ADAM = FitSettings(epochs=3, batch_size=8, lr=1e-2, optimizer="adam", weight_decay=1e-3)
SGD = FitSettings(epochs=3, batch_size=8, lr=5e-2, optimizer="sgd", momentum=0.9, weight_decay=1e-3)


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X (N, 1, 8, 8), y (N,), masks (K, N) with PER_MODEL True entries per row."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, *SHAPE, generator=g, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g)
    masks = torch.zeros(K, N, dtype=torch.bool)
    for k in range(K):
        masks[k, torch.randperm(N, generator=g)[:PER_MODEL]] = True
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == K  # distinct subsets
    return X, y, masks


def _alone(cfg: ModelConfig, X, y, masks, settings: FitSettings) -> list[dict[str, torch.Tensor]]:
    """Reference: each model trained alone by fit on its own subset, in X's dtype."""
    out = []
    for mask, seed in zip(masks, SEEDS, strict=True):
        model = build_model(cfg, SHAPE, C, seed).to(X.dtype)
        fit(model, X[mask], y[mask], settings, seed)
        out.append({n: p.detach() for n, p in model.named_parameters()})
    return out


def _assert_matches_alone(stacked, alone, atol: float = ATOL) -> None:
    assert set(stacked) == set(alone[0])
    for k, ref in enumerate(alone):
        for name, p in unstack(stacked, k).items():
            assert p.dtype == ref[name].dtype
            torch.testing.assert_close(p, ref[name], atol=atol, rtol=0, msg=f"model {k} {name}")


@pytest.mark.parametrize("settings", [ADAM, SGD], ids=["adam", "sgd"])
@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_each_model_equals_the_model_trained_alone(cfg, settings):
    X, y, masks = _data()
    stacked = train_ensemble(cfg, SHAPE, C, X, y, masks, SEEDS, settings)
    assert all(t.shape[0] == K for t in stacked.values())
    alone = _alone(cfg, X, y, masks, settings)
    _assert_matches_alone(stacked, alone)
    # training moved the weights (the comparison is not init against init)
    init = build_model(cfg, SHAPE, C, SEEDS[0]).double().state_dict()
    assert max(float((unstack(stacked, 0)[n] - init[n]).abs().max()) for n in init) > 1e-3


def test_generic_vmap_path_equals_the_mlp_fast_path_and_fit(monkeypatch):
    X, y, masks = _data()
    fast = train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, ADAM)
    monkeypatch.setattr(ensemble, "_mlp_plan", lambda base: None)
    generic = train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, ADAM)
    for name in fast:
        torch.testing.assert_close(fast[name], generic[name], atol=ATOL, rtol=0)
    _assert_matches_alone(generic, _alone(MLP, X, y, masks, ADAM))


def test_reference_trainer_equals_fit_loop():
    X, y, masks = _data()
    ref = train_ensemble_reference(MLP, SHAPE, C, X, y, masks, SEEDS, SGD)
    _assert_matches_alone(ref, _alone(MLP, X, y, masks, SGD), atol=0.0)


def test_float32_matches_fit_to_float32_rounding():
    X, y, masks = _data(torch.float32)
    stacked = train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, ADAM)
    assert all(t.dtype == torch.float32 for t in stacked.values())
    _assert_matches_alone(stacked, _alone(MLP, X, y, masks, ADAM), atol=1e-5)


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_model_sees_only_its_own_subset(cfg):
    X, y, masks = _data()
    before = train_ensemble(cfg, SHAPE, C, X, y, masks, SEEDS, ADAM)
    outside = ~masks[1]
    X2, y2 = X.clone(), y.clone()
    X2[outside] = torch.randn_like(X2[outside]) * 5
    y2[outside] = (y2[outside] + 1) % C
    after = train_ensemble(cfg, SHAPE, C, X2, y2, masks, SEEDS, ADAM)
    for name in before:
        assert torch.equal(before[name][1], after[name][1]), name  # bit-identical
    # the other models do see (some of) the changed rows, so they change
    for k in (0, 2):
        assert any(not torch.equal(before[n][k], after[n][k]) for n in before)


def test_unequal_mask_counts_raise_naming_the_counts():
    X, y, masks = _data()
    masks[2, masks[2].nonzero()[0]] = False  # row 2 now selects 29
    with pytest.raises(ValueError, match=r"\[30, 30, 29\]"):
        train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, ADAM)


def test_seed_count_must_match_mask_rows():
    X, y, masks = _data()
    with pytest.raises(ValueError, match="3 rows .* 2 seeds"):
        train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS[:2], ADAM)


def test_other_malformed_inputs_raise():
    X, y, masks = _data()
    with pytest.raises(ValueError, match="bool"):
        train_ensemble(MLP, SHAPE, C, X, y, masks.long(), SEEDS, ADAM)
    with pytest.raises(ValueError, match="columns"):
        train_ensemble(MLP, SHAPE, C, X[:-1], y[:-1], masks, SEEDS, ADAM)
    with pytest.raises(ValueError, match="empty"):
        train_ensemble(MLP, SHAPE, C, X, y, torch.zeros_like(masks), SEEDS, ADAM)
    with pytest.raises(ValueError, match="unknown optimizer"):
        bad = FitSettings(epochs=1, batch_size=8, lr=1e-2, optimizer="rmsprop")
        train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, bad)


@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_ensemble_logits_match_predict_logits(cfg):
    X, y, masks = _data()
    stacked = train_ensemble(cfg, SHAPE, C, X, y, masks, SEEDS, ADAM)
    T = X[:23]
    got = ensemble_logits(cfg, SHAPE, C, stacked, T, batch_size=7)  # several chunks
    assert got.shape == (K, len(T), C)
    for k in range(K):
        model = build_model(cfg, SHAPE, C, 0).double()
        model.load_state_dict(unstack(stacked, k))  # strict: names and shapes match
        torch.testing.assert_close(got[k], predict_logits(model, T), atol=ATOL, rtol=0)
    assert ensemble_logits(cfg, SHAPE, C, stacked, X[:0]).shape == (K, 0, C)


def test_train_step_flops_counts_linear_and_conv_layers():
    # MLP (16, 16) on 64 inputs: 64·16 + 16·16 + 16·10 multiply-adds per sample
    assert train_step_flops(MLP, SHAPE, C, 8) == 2 * 3 * 8 * (64 * 16 + 16 * 16 + 16 * 10)
    # CNN (4, 8) on 1×8×8: conv 1→4 at 8×8, pool, conv 4→8 at 4×4, pool, avgpool 2, Linear 32→10
    macs = 4 * 8 * 8 * (1 * 9) + 8 * 4 * 4 * (4 * 9) + 32 * 10
    assert train_step_flops(CNN, SHAPE, C, 5) == 2 * 3 * 5 * macs


# (cpu_parallel, cpu_block_mib, cfg): the block sizes each setting trains, with 2 torch threads
# and K = 3. 0.05 MiB holds one float64 MLP 16-16 (1,482 parameters × 8 bytes × 4 arrays);
# blocks by size apply to the MLP only.
BLOCKS = [
    ("models", 8.0, MLP, [1, 2]),  # a block per thread
    ("ops", 8.0, MLP, [3]),  # one loop over torch's two threads
    ("models", 0.05, MLP, [1, 1, 1]),  # blocks of one model, shared out to two threads
    ("ops", 0.05, MLP, [1, 1, 1]),  # blocks of one model, one after another
    ("models", 0.05, CNN, [1, 2]),
    ("ops", 0.05, CNN, [3]),
]


@pytest.mark.parametrize(
    "cpu_parallel,block_mib,cfg,sizes",
    BLOCKS,
    ids=[f"{p}-{m}MiB-{c.name}" for p, m, c, _ in BLOCKS],
)
def test_cpu_blocks_and_threads_equal_models_trained_alone(
    cpu_parallel, block_mib, cfg, sizes, monkeypatch
):
    """Each block is trained by its own loop: "models" on worker threads with one torch
    thread each, "ops" on the caller's thread with its 2 torch threads. Each model must equal
    the one trained alone whatever the blocks, and the caller keeps its thread count."""
    seen = []
    rows_init = ensemble._EpochRows.__init__  # made once by every training loop

    def spy(self, masks, *args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads(), masks.shape[0]))
        rows_init(self, masks, *args, **kwargs)

    monkeypatch.setattr(ensemble._EpochRows, "__init__", spy)
    X, y, masks = _data()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stacked = train_ensemble(
            cfg, SHAPE, C, X, y, masks, SEEDS, ADAM, cpu_parallel=cpu_parallel,
            cpu_block_mib=block_mib,
        )  # fmt: skip
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert sorted(k for _, _, k in seen) == sizes
    if cpu_parallel == "models":  # worker threads, one torch thread each
        assert len({name for name, _, _ in seen}) == 2
        assert all(name.startswith("ensemble") and t == 1 for name, t, _ in seen)
    else:
        assert all(name == threading.current_thread().name and t == 2 for name, t, _ in seen)
    assert all(t.shape[0] == K for t in stacked.values())
    _assert_matches_alone(stacked, _alone(cfg, X, y, masks, ADAM))


@pytest.mark.parametrize(
    "settings",
    [ADAM, SGD, FitSettings(epochs=1, batch_size=8, lr=0.1, optimizer="sgd", momentum=0.0)],
    ids=["adam", "sgd", "sgd-no-momentum"],
)
def test_flat_optimizer_is_torch_optims_fused_step_bit_for_bit(settings):
    """The MLP path calls torch's fused kernels itself; five steps must give exactly what
    torch.optim's fused optimizer gives (a torch release that changed the kernels'
    arguments or defaults would show here)."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(1000, generator=g, dtype=torch.float32)
    flat = ensemble._FlatParams({"w": ref.clone().view(10, 100)})
    ref.requires_grad_()
    opt = ensemble._stacked_optimizer([ref], settings)
    mine = ensemble._FlatOptimizer(flat, settings)
    for _ in range(5):
        grad = torch.randn(1000, generator=g)
        ref.grad = grad.clone()
        flat.grad.copy_(grad)
        opt.step()
        mine.step()
        assert torch.equal(flat.data, ref.detach())


def test_unknown_cpu_parallel_raises():
    X, y, masks = _data()
    with pytest.raises(ValueError, match="cpu_parallel .* 'threads'"):
        train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, ADAM, cpu_parallel="threads")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
def test_stacked_init_equals_build_model_bit_for_bit(cfg, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # 2: the seeds are drawn by two threads
    try:
        seeds = [3, 99, 7, 12345, 0]
        stacked = ensemble._init_stacked(build_model(cfg, SHAPE, C, 1), seeds)
    finally:
        torch.set_num_threads(before)
    assert stacked is not None
    for k, seed in enumerate(seeds):
        ref = dict(build_model(cfg, SHAPE, C, seed).named_parameters())
        assert set(ref) == set(stacked)
        assert all(torch.equal(stacked[n][k], ref[n]) for n in ref)


@pytest.mark.parametrize("workers", [1, 3])
def test_accelerator_epoch_rows_equal_the_cpu_draw(workers):
    """The accelerator path draws each epoch's permutations in slices on a thread pool,
    ahead of time; the host rows it ships must be the CPU path's, epoch by epoch."""
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(5, 40, dtype=torch.bool)
    masks.scatter_(1, torch.rand(5, 40, generator=g).argsort(1)[:, :17], True)
    seeds = [4, 8, 15, 16, 23]
    want = list(ensemble._EpochRows(masks, seeds, 17, 3, torch.device("cpu")))
    rows = ensemble._EpochRows(masks, seeds, 17, 3, torch.device("meta"), workers=workers)
    got = [r.clone() for r in rows.host_epochs()]
    assert rows.pool is None  # the draw threads are stopped at the end
    assert len(got) == len(want) == 3
    assert not torch.equal(want[0], want[1])  # a new permutation every epoch
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.int32 and torch.equal(a.long(), b)
    assert all(torch.equal(r.sort(1).values, masks.nonzero()[:, 1].view(5, 17)) for r in want)


def test_returned_tensors_own_their_storage(tmp_path):
    """The MLP path keeps all parameters in one flat buffer; what it returns must not alias
    it (or each other): safetensors refuses shared storage, and callers may modify them."""
    from safetensors.torch import load_file, save_file

    X, y, masks = _data(torch.float32)
    stacked = train_ensemble(MLP, SHAPE, C, X, y, masks, SEEDS, ADAM)
    ptrs = {t.untyped_storage().data_ptr() for t in stacked.values()}
    assert len(ptrs) == len(stacked)
    save_file(stacked, str(tmp_path / "w.safetensors"))
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[n], stacked[n]) for n in stacked)


# --------------------------------------------------------------------------- CUDA (marked gpu)
# Tolerances on CUDA, parameters after 3 epochs (12 steps) against each model trained alone
# by fit on the CPU: float64 1e-10 (the device path computes the same thing); float32 with
# TF32 off 1e-4 (kernel rounding, amplified a little by Adam); TF32 on 5e-2 for the MLP
# (10-bit mantissa products: Adam's normalised steps can flip where a gradient is near zero).
# The CNN with TF32 on is not claimed equal: on an H100 (2026-11-26, torch 2.11) model 2's
# second conv weight differed from the CPU by more than 5e-2 after the 12 steps, so TF32
# (``ray.tf32``) stays off by default and the tolerance is stated for the MLP only.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg", [MLP, CNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize(
    "dtype,tf32,atol",
    [(torch.float64, False, 1e-10), (torch.float32, False, 1e-4), (torch.float32, True, 5e-2)],
    ids=["float64", "float32", "tf32"],
)
def test_cuda_ensemble_matches_models_trained_alone_on_cpu(cfg, dtype, tf32, atol):
    if tf32 and cfg is CNN:
        pytest.skip("TF32 convolutions are not within 5e-2 of the CPU (comment above)")
    X, y, masks = _data(dtype)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _tf32(tf32)
    try:
        stacked = train_ensemble(
            cfg, SHAPE, C, X, y, masks, SEEDS, ADAM, device=torch.device("cuda")
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert all(t.device.type == "cpu" for t in stacked.values())
    _assert_matches_alone(stacked, _alone(cfg, X, y, masks, ADAM), atol=atol)


@pytest.mark.gpu
@cuda
def test_cuda_compiled_generic_path_matches_eager():
    X, y, masks = _data(torch.float32)
    _tf32(False)
    dev = torch.device("cuda")
    eager = train_ensemble(CNN, SHAPE, C, X, y, masks, SEEDS, ADAM, device=dev)
    compiled = train_ensemble(CNN, SHAPE, C, X, y, masks, SEEDS, ADAM, device=dev, compile=True)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=0)
