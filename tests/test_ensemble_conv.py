"""The Triton ensemble convolution (pipeline_lib/training/ensemble_conv.py) against torch.

Without a CUDA device the kernels run in Triton's interpreter (TRITON_INTERPRET=1 while this
module imports them, so the kernels are defined interpreted), so CI checks the same kernel
code a card compiles: values and all three gradients against ``F.conv2d`` per model, the
registry CNN built on it against the trainer's vmap path, and whole training runs against
models trained alone. Float64, so rounding cannot hide an indexing error (asserted at
1e-12). On a machine with a card the
same tests run compiled, in float32 with TF32 off, at 1e-4 of the largest value
(``bash benchmarks/gpu_session.sh`` with ``STEPS=conv_tests``). Its speed is measured there
by ``python -m benchmarks.gpu_cnn_variants``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.image import build_model
from pipeline_lib.training import ensemble
from pipeline_lib.training.ensemble import train_ensemble
from pipeline_lib.training.fit import FitSettings, fit

pytest.importorskip("triton")
if torch.cuda.is_available():
    from pipeline_lib.training import ensemble_conv
else:  # the kernels are defined interpreted; the variable is not left to the other tests
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from pipeline_lib.training import ensemble_conv
    finally:
        del os.environ["TRITON_INTERPRET"]
    assert ensemble_conv.INTERPRETED


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Triton's interpreter reads the variable at each launch too; set for these tests only."""
    if ensemble_conv.INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the interpreter computes in float64: exact to rounding (1e-12); a card in float32 with
# TF32 off (Triton's "ieee" products): 1e-4 of the largest value compared
DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    if DTYPE == torch.float64:
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    else:
        scale = float(want.abs().max()) or 1.0
        torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


@pytest.fixture(autouse=True)
def _full_float32():
    """On a card: TF32 off for torch's products and convolutions, as the pipeline's default."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _reference(x, w, b, mode="linear"):
    """Per model, torch's convolution (then ReLU, then 2×2 max-pooling, by ``mode``):
    (K, B, H, W, C) → (K, B, H', W', O)."""
    outs = []
    for k in range(len(x)):
        out = F.conv2d(x[k].permute(0, 3, 1, 2), w[k], b[k], padding=1)
        if mode != "linear":
            out = F.relu(out)
        if mode.startswith("relu-pool"):
            out = F.max_pool2d(out, 2, ceil_mode=True)
        outs.append(out.permute(0, 2, 3, 1))
    return torch.stack(outs)


def _ours(x, w, b, mode):
    if mode.startswith("relu-pool"):
        return ensemble_conv.conv3x3_relu_pool(x, w, b)
    return ensemble_conv.conv3x3(x, w, b, relu=mode == "relu")


def _leaves(*shapes, dtype=DTYPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).to(DEVICE).requires_grad_() for s in shapes]


# (K, B, H, W, C, O): one input channel (9 taps < one reduction block), several channels
# (a block per tap), odd image sides, positions not a multiple of the 64-position tile
CASES = [(3, 2, 8, 8, 1, 4), (2, 3, 5, 7, 4, 8), (2, 1, 6, 6, 16, 32)]


@pytest.mark.parametrize("mode", ["linear", "relu", "relu-pool", "relu-pool-unpool"])
@pytest.mark.parametrize("case", CASES, ids=["c1", "c4-odd", "c16"])
def test_conv3x3_and_its_gradients_equal_conv2d_per_model(case, mode, monkeypatch):
    """conv3x3 (with and without its ReLU) and conv3x3_relu_pool, whose backward applies
    the ReLU's rule to the pooled gradient, then either lets torch unpool it or has the
    kernels read it through the argmax ("-unpool"); "c4-odd" pools a 5×7 image (partial
    windows)."""
    monkeypatch.setattr(ensemble_conv, "UNPOOL_IN_KERNELS", mode.endswith("-unpool"))
    k, b, h, w, c, o = case
    # several partial sums of the weight gradient, none a multiple of the tile
    monkeypatch.setattr(ensemble_conv, "WGRAD_POSITIONS_PER_SPLIT", 24)
    x, wt, bias = _leaves((k, b, h, w, c), (k, o, c, 3, 3), (k, o))
    x2, wt2, bias2 = (t.detach().clone().requires_grad_() for t in (x, wt, bias))
    out = _ours(x, wt, bias, mode)
    ref = _reference(x2, wt2, bias2, mode)
    if mode != "linear":  # the ReLU is on for some outputs and off for others (pooled: some
        # windows are all off, which the pooled ReLU rule must zero)
        assert 0.0 < float((ref > 0).double().mean()) < 1.0
    pooled = mode.startswith("relu-pool")
    assert out.shape == (k, b, -(-h // 2) if pooled else h, -(-w // 2) if pooled else w, o)
    _close(out, ref)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(g.to(DEVICE))
    ref.backward(g.to(DEVICE))
    for got, want in ((x.grad, x2.grad), (wt.grad, wt2.grad), (bias.grad, bias2.grad)):
        _close(got, want)


def test_weight_gradient_row_tiles_agree(monkeypatch):
    """The weight gradient's rows in blocks of 16, 32 or 64 (144 rows: a partial last block)."""
    x, wt, bias = _leaves((2, 2, 5, 5, 16), (2, 8, 16, 3, 3), (2, 8))
    grads = []
    for rows in (16, 32, 64):
        monkeypatch.setattr(ensemble_conv, "WGRAD_BLOCK_R", rows)
        wt.grad = None
        ensemble_conv.conv3x3(x, wt, bias).pow(2).sum().backward()
        grads.append(wt.grad.clone())
    wt2 = wt.detach().clone().requires_grad_()
    _reference(x.detach(), wt2, bias.detach()).pow(2).sum().backward()
    for got in grads:
        _close(got, wt2.grad)


def test_conv3x3_float32_within_float32_rounding_of_float64():
    x, wt, bias = _leaves((2, 2, 6, 6, 4), (2, 8, 4, 3, 3), (2, 8), dtype=torch.float32)
    want = _reference(*(t.detach().cpu().double() for t in (x, wt, bias)))
    with torch.no_grad():
        got = ensemble_conv.conv3x3(x, wt, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


def test_conv3x3_rejects_shapes_naming_them():
    x, wt, bias = _leaves((2, 2, 6, 6, 4), (2, 8, 4, 3, 3), (2, 8))
    with pytest.raises(ValueError, match=r"\(2, 8, 3, 3, 3\)"):
        ensemble_conv.conv3x3(x, wt[:, :, :3], bias)
    with pytest.raises(ValueError, match="K, B, H, W, C"):
        ensemble_conv.conv3x3(x[0], wt, bias)
    with pytest.raises(ValueError, match="float32 inputs .* got torch.float16"):
        ensemble_conv.conv3x3(x.half(), wt.half(), bias.half())


# the registry CNN: 8×8 digits (8 → 4 → 2), and three layers on 10×10 (10 → 5 → 3 → 2:
# ceil-mode pooling of an odd side)
NETS = [((1, 8, 8), ModelConfig(name="cnn", channels=(4, 8))),
        ((1, 10, 10), ModelConfig(name="cnn", channels=(2, 3, 4)))]  # fmt: skip


@pytest.mark.parametrize("unpool", [False, True], ids=["torch-unpool", "kernel-unpool"])
@pytest.mark.parametrize("shape,cfg", NETS, ids=["digits", "three-layers"])
def test_cnn_forward_and_gradients_equal_the_vmap_path(shape, cfg, unpool, monkeypatch):
    monkeypatch.setattr(ensemble_conv, "UNPOOL_IN_KERNELS", unpool)
    k, b, n_classes = 3, 5, 10
    template = build_model(cfg, shape, n_classes, 0)
    stacked = ensemble._init_stacked(template, [4, 9, 2])
    base = template.to("meta", DTYPE)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(k, b, *shape, generator=g, dtype=DTYPE).to(DEVICE)
    grads = []
    for forward in (ensemble._vmap_forward(base), ensemble._triton_forward(base)):
        params = {n: t.to(DEVICE, DTYPE).requires_grad_() for n, t in stacked.items()}
        logits = forward(params, x)
        assert logits.shape == (k, n_classes, b)
        logits.pow(2).sum().backward()
        grads.append((logits.detach(), {n: p.grad for n, p in params.items()}))
    (want, want_grads), (got, got_grads) = grads
    _close(got, want)
    for name in want_grads:
        _close(got_grads[name], want_grads[name])


SHAPE, N, PER_MODEL = (1, 8, 8), 40, 20
CNN = NETS[0][1]
ADAM = FitSettings(epochs=2, batch_size=8, lr=1e-2, optimizer="adam", weight_decay=1e-3)


def _data(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, *SHAPE, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (N,), generator=g)
    masks = torch.zeros(3, N, dtype=torch.bool)
    for k in range(3):
        masks[k, torch.randperm(N, generator=g)[:PER_MODEL]] = True
    return X, y, masks


@pytest.mark.parametrize("unpool", [False, True], ids=["torch-unpool", "kernel-unpool"])
def test_trainer_with_triton_convolutions_equals_models_trained_alone(unpool, monkeypatch):
    """Two epochs of Adam, batch 8 over 20 samples (a partial last batch), on the device,
    against each model trained alone by fit on the CPU."""
    monkeypatch.setattr(ensemble_conv, "UNPOOL_IN_KERNELS", unpool)
    X, y, masks = _data(DTYPE)
    seeds = [11, 5, 23]
    stacked = train_ensemble(
        CNN, SHAPE, 10, X, y, masks, seeds, ADAM, device=DEVICE, conv_kernel="triton"
    )
    for k, (mask, seed) in enumerate(zip(masks, seeds, strict=True)):
        model = build_model(CNN, SHAPE, 10, seed).to(DTYPE)
        fit(model, X[mask], y[mask], ADAM, seed)
        for name, p in model.named_parameters():
            _close(stacked[name][k], p.detach())


def test_conv_kernel_refusals_before_any_work(monkeypatch):
    X, y, masks = _data(torch.float64)
    mlp = ModelConfig(name="mlp", hidden=(8,))
    with pytest.raises(ValueError, match="conv_kernel must be one of"):
        train_ensemble(CNN, SHAPE, 10, X, y, masks, [1, 2, 3], ADAM, conv_kernel="cudnn")
    with pytest.raises(ValueError, match="registry CNN only, not 'mlp'"):
        train_ensemble(mlp, SHAPE, 10, X, y, masks, [1, 2, 3], ADAM, conv_kernel="triton")
    if DEVICE.type == "cpu":  # as if imported without the interpreter
        monkeypatch.setattr(ensemble_conv, "INTERPRETED", False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            train_ensemble(CNN, SHAPE, 10, X, y, masks, [1, 2, 3], ADAM, conv_kernel="triton")
