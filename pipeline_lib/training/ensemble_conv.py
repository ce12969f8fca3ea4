"""K models' 3×3 convolutions in one kernel launch each: Triton implicit GEMMs (issue 17).

On an H200 the ensemble trainer's generic CNN path (``torch.func.vmap``) turns each
convolution of K models into one ``groups=K`` convolution, and cuDNN runs that as one small
kernel per group plus a layout conversion for each: 256 launches per convolution at K = 256,
and 42 model-epochs/s at best (BENCHMARKS.md, "GPU rerun on an NVIDIA H200"). Here each
convolution of all K models is one launch whose grid has the model as an axis.

The convolution is the registry CNN's (:class:`pipeline_lib.models.image.SmallCNN`):
3×3, stride 1, padding 1. Activations are channels-last, ``(K, B, H, W, C)``, so one model's
B·H·W positions are the rows of a matrix and its channels the columns. For model k::

    out[k, p, o] = Σ_r A_k[p, r] · Wr[k, r, o] + bias[k, o],   r = (tap, c), tap = 3·i + j,
    A_k[(b, h, w), (tap, c)] = x[k, b, h + i − 1, w + j − 1, c]    (0 outside the image)

a matrix product whose left factor ``A_k`` (im2col) is never written out: each program
gathers the tile of it that it needs (an *implicit* GEMM). The backward pass is two more
such products:

- input gradient: the same kernel on ``g`` with the weights flipped and transposed,
  ``dx = conv(g, W')`` where ``W'[c, o, i, j] = W[o, c, 2 − i, 2 − j]``;
- weight gradient: ``dWr[k] = A_kᵀ g_k``, a reduction over the B·H·W positions, split
  into ``splits`` partial sums added afterwards (more programs than K alone gives);
- bias gradient: ``Σ_p g[k, p, o]`` (torch).

The bias and an optional ReLU are added in the forward kernel itself (``relu=True``); the
backward pass then starts with autograd's ReLU rule on the saved output.
:func:`conv3x3_relu_pool` (what :func:`cnn_forward` uses) adds the 2×2 max-pooling and
applies the ReLU's rule to the pooled gradient instead, which is exact and 4× smaller
(:class:`_ConvReluPool`); with :data:`UNPOOL_IN_KERNELS` the backward kernels also read the
full-size gradient through the pooling's argmax rather than have it written.

Precision: the products accumulate in the output's dtype, float32. Float64 runs only in
Triton's interpreter (the tests): a float64 ``tl.dot`` is not available on cards in every
Triton version, so :func:`conv3x3` refuses it there. In float32 ``tl.dot`` uses TF32 unless
``input_precision="ieee"``; the kernels get "tf32" exactly when
``torch.backends.cuda.matmul.allow_tf32`` is on, as the trainer's other products do.

Without a CUDA device the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1``
is set as this module is first imported (:data:`INTERPRETED`) and at each launch; that is
how the CPU test suite checks them against ``torch.nn.functional.conv2d``
(tests/test_ensemble_conv.py). Their speed is a GPU matter:
``python -m benchmarks.gpu_cnn_variants``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

# Tile sizes (tl.dot needs every dimension ≥ 16), read at each call: not tuned on a card
# yet; `python -m benchmarks.gpu_cnn_variants` times a sweep of them.
BLOCK_P = 64  # output positions per program (forward, input gradient)
BLOCK_R = 16  # reduction step: one tap of 16 channels, or all 9 taps of one channel
WGRAD_BLOCK_R = 16  # weight-gradient rows per program (each such block re-reads x and g)
WGRAD_BLOCK_P = 64  # positions per reduction step of the weight gradient
WGRAD_POSITIONS_PER_SPLIT = 4096  # positions summed by one weight-gradient program
NUM_WARPS = 4  # per program, both kernels
# conv → ReLU → pool's backward: False, torch's max-pooling backward writes the full-size
# gradient, which the kernels read; True, the kernels read the pooled gradient and the
# argmax instead (nothing full-size written). The same values; which is faster is for
# `python -m benchmarks.gpu_cnn_variants` (variant `triton-unpool`) to tell.
UNPOOL_IN_KERNELS = False


def _block(n: int) -> int:
    """A tile side covering n: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _implicit_gemm(
    x_ptr,  # (K, B, H, W, C) contiguous; with UNPOOL the pooled (K, B, H2, W2, C)
    idx_ptr,  # with UNPOOL: (K, B, H2, W2, C) int64, max-pooling's argmax h·W + w per window
    w_ptr,  # (K, 9·C, O) contiguous: Wr
    bias_ptr,  # (K, O) contiguous, read when HAS_BIAS
    out_ptr,  # (K, B, H, W, O) contiguous
    P,  # B·H·W positions per model
    H,
    W,
    C,
    O,  # noqa: E741
    Q,  # with UNPOOL: B·H2·W2 pooled positions per model
    H2,
    W2,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    UNPOOL: tl.constexpr,
):
    """out[k, p, :] = Σ_r A_k[p, r] Wr[k, r, :] (+ bias[k, :]) (then ReLU) for BLOCK_P
    positions p of model k: the bias and the ReLU in the same pass as the product.

    UNPOOL: x is not stored; its value at (b, h, w, c) is the pooled x at its window if the
    window's argmax is (h, w), else 0 (what max-pooling's backward would have written)."""
    k = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    w_at = p % W
    h_at = (p // W) % H
    b_at = p // (H * W)
    o = tl.arange(0, BLOCK_O)
    o_ok = o < O
    R = 9 * C
    x_k = x_ptr + k * P * C
    w_k = w_ptr + k * R * O
    acc = tl.full((BLOCK_P, BLOCK_O), 0, dtype=out_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        tap = r // C
        c = r % C
        hh = h_at[:, None] + (tap // 3 - 1)[None, :]
        ww = w_at[:, None] + (tap % 3 - 1)[None, :]
        inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        a_ok = p_ok[:, None] & r_ok[None, :] & inside
        if UNPOOL:
            q = ((b_at[:, None] * H2 + hh // 2) * W2 + ww // 2) * C + c[None, :]
            v = tl.load(x_ptr + k * Q * C + q, mask=a_ok, other=0.0)
            arg = tl.load(idx_ptr + k * Q * C + q, mask=a_ok, other=-1)
            a = tl.where(arg == hh * W + ww, v, 0.0)
        else:
            a = tl.load(
                x_k + ((b_at[:, None] * H + hh) * W + ww) * C + c[None, :], mask=a_ok, other=0.0
            )
        wt = tl.load(
            w_k + r[:, None] * O + o[None, :], mask=r_ok[:, None] & o_ok[None, :], other=0.0
        )
        acc += tl.dot(a, wt, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k * O + o, mask=o_ok, other=0.0)[None, :]
    if RELU:
        acc = tl.where(acc > 0, acc, 0.0)
    tl.store(
        out_ptr + k * P * O + p[:, None] * O + o[None, :],
        acc,
        mask=p_ok[:, None] & o_ok[None, :],
    )


@triton.jit
def _weight_grad(
    x_ptr,  # (K, B, H, W, C) contiguous
    g_ptr,  # (K, B, H, W, O) contiguous; with UNPOOL the pooled (K, B, H2, W2, O)
    idx_ptr,  # with UNPOOL: (K, B, H2, W2, O) int64, max-pooling's argmax h·W + w
    out_ptr,  # (S, K, 9·C, O) contiguous: partial sums of dWr, one per split
    P,
    H,
    W,
    C,
    O,  # noqa: E741
    Q,  # with UNPOOL: B·H2·W2
    H2,
    W2,
    POSITIONS_PER_SPLIT,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr,
    UNPOOL: tl.constexpr,
):
    """out[s, k, r, :] = Σ_{p in split s} A_k[p, r] g[k, p, :] for BLOCK_R rows r (UNPOOL:
    g read through the pooling's argmax, as in :func:`_implicit_gemm`)."""
    k = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    K = tl.num_programs(1)
    R = 9 * C
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    tap = r // C
    c = r % C
    di = tap // 3 - 1
    dj = tap % 3 - 1
    o = tl.arange(0, BLOCK_O)
    o_ok = o < O
    x_k = x_ptr + k * P * C
    g_k = g_ptr + k * P * O
    acc = tl.full((BLOCK_R, BLOCK_O), 0, dtype=out_ptr.dtype.element_ty)
    # (no tl.minimum, no tl.zeros: Triton's library functions are jit functions themselves,
    # and under the interpreter they work only if triton was imported with TRITON_INTERPRET=1)
    first = s * POSITIONS_PER_SPLIT
    last = tl.where(first + POSITIONS_PER_SPLIT < P, first + POSITIONS_PER_SPLIT, P)
    for p0 in range(first, last, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < last
        w_at = p % W
        h_at = (p // W) % H
        b_at = p // (H * W)
        hh = h_at[None, :] + di[:, None]
        ww = w_at[None, :] + dj[:, None]
        inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        at_ok = r_ok[:, None] & p_ok[None, :] & inside
        at = tl.load(
            x_k + ((b_at[None, :] * H + hh) * W + ww) * C + c[:, None], mask=at_ok, other=0.0
        )  # (BLOCK_R, BLOCK_P): the transposed tile of A_k
        g_ok = p_ok[:, None] & o_ok[None, :]
        if UNPOOL:
            q = ((b_at * H2 + h_at // 2) * W2 + w_at // 2)[:, None] * O + o[None, :]
            v = tl.load(g_ptr + k * Q * O + q, mask=g_ok, other=0.0)
            arg = tl.load(idx_ptr + k * Q * O + q, mask=g_ok, other=-1)
            gt = tl.where(arg == (h_at * W + w_at)[:, None], v, 0.0)
        else:
            gt = tl.load(g_k + p[:, None] * O + o[None, :], mask=g_ok, other=0.0)
        acc += tl.dot(at, gt, input_precision=PRECISION)
    tl.store(
        out_ptr + ((s * K + k) * R + r[:, None]) * O + o[None, :],
        acc,
        mask=r_ok[:, None] & o_ok[None, :],
    )


#: True when this module was imported under ``TRITON_INTERPRET=1``: its kernels then run in
#: Triton's interpreter, on CPU tensors too (what the test suite does without a card).
INTERPRETED = type(_implicit_gemm).__name__ == "InterpretedFunction"


def _precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and t.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _gemm(
    x: torch.Tensor, wr: torch.Tensor, o: int, bias: torch.Tensor | None = None,
    relu: bool = False, unpool: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """(K, B, H, W, C) channels-last x, (K, 9·C, O) weights → (K, B, H, W, O), with the
    (K, O) bias added and the ReLU applied in the kernel when given. ``unpool=(idx, H, W)``:
    x is a pooled (K, B, H2, W2, C) gradient and ``idx`` its argmax (same shape); the
    kernel reads the unpooled (K, B, H, W, C) it stands for without it being written."""
    k, b, h, w, c = x.shape
    idx, h2, w2 = x, 1, 1  # (idx, H2, W2 unused without unpool)
    if unpool is not None:
        h2, w2 = h, w  # x is pooled: its sides are H2, W2
        idx, h, w = unpool
    out = torch.empty(k, b, h, w, o, dtype=x.dtype, device=x.device)
    p = b * h * w
    grid = (triton.cdiv(p, BLOCK_P), k)
    _implicit_gemm[grid](
        x, idx, wr, out if bias is None else bias.contiguous(), out, p, h, w, c, o,
        b * h2 * w2, h2, w2,
        BLOCK_P=BLOCK_P, BLOCK_R=BLOCK_R, BLOCK_O=_block(o), PRECISION=_precision(x),
        HAS_BIAS=bias is not None, RELU=relu, UNPOOL=unpool is not None,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """(K, O, C, 3, 3) → Wr (K, 9·C, O), row r = (3·i + j)·C + c."""
    k, o, c = weight.shape[:3]
    return weight.permute(0, 3, 4, 2, 1).reshape(k, 9 * c, o).contiguous()


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool
    ) -> torch.Tensor:
        out = _gemm(x, _rows(weight), weight.shape[1], bias, relu)
        ctx.relu = relu
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_):
        x, weight, out = ctx.saved_tensors
        if ctx.relu:  # through the ReLU first: zero where it was off (autograd's own rule)
            g = torch.ops.aten.threshold_backward(g, out, 0)
        g = g.contiguous()
        dx, dw = _input_and_weight_grads(ctx.needs_input_grad, x, weight, g)
        db = g.sum(dim=(1, 2, 3)) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def _input_and_weight_grads(
    needs: tuple[bool, ...], x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor,
    idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """dx and dW of the convolution from ``g`` (K, B, H, W, O) contiguous, the gradient of
    its output before any ReLU; each only if ``needs[0]`` / ``needs[1]``. With ``idx``, g
    is the pooled gradient (K, B, H2, W2, O) and ``idx`` max-pooling's argmax (same shape):
    the kernels read the full-size gradient through them instead."""
    k, o, c = weight.shape[:3]
    b, h, w = x.shape[1:4]
    unpool = None if idx is None else (idx, h, w)
    h2, w2 = g.shape[2:4]
    dx = dw = None
    if needs[0]:
        # dx = conv(g, W'), W'[c, o, i, j] = W[o, c, 2 − i, 2 − j]
        dx = _gemm(g, _rows(weight.flip(3, 4).transpose(1, 2)), c, unpool=unpool)
    if needs[1]:
        p = b * h * w
        per_split = WGRAD_POSITIONS_PER_SPLIT
        splits = triton.cdiv(p, per_split)
        partial = torch.empty(splits, k, 9 * c, o, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(9 * c, WGRAD_BLOCK_R), k, splits)
        _weight_grad[grid](
            x, g, g if idx is None else idx, partial, p, h, w, c, o, b * h2 * w2, h2, w2,
            per_split,
            BLOCK_P=WGRAD_BLOCK_P, BLOCK_R=WGRAD_BLOCK_R, BLOCK_O=_block(o),
            PRECISION=_precision(x), UNPOOL=idx is not None, num_warps=NUM_WARPS,
        )  # fmt: skip
        # (K, 9·C, O) rows (i, j, c) → (K, O, C, 3, 3)
        dw = partial.sum(0).view(k, 3, 3, c, o).permute(0, 4, 3, 1, 2).contiguous()
    return dx, dw


class _ConvReluPool(torch.autograd.Function):
    """conv3x3 → ReLU → 2×2 max-pooling (``ceil_mode``), one layer of the registry CNN.

    Forward: the convolution with its bias and ReLU in one kernel, then torch's max-pooling
    with indices. Backward: the ReLU's rule is applied to the *pooled* gradient. That is
    exact: the pooling sends each pooled gradient to one position of its window, the one
    holding the window's maximum, whose ReLU output is the pooled value y; so the ReLU
    passes it exactly when y > 0, and every other position gets 0 either way. This saves
    the full-size ReLU pass (its read of the gradient and the output, its write), 4× larger
    than the pooled one; the bias gradient is summed over the pooled gradient too (the
    same values, fewer of them: the other positions are zeros).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        out = _gemm(x, _rows(weight), weight.shape[1], bias, relu=True)  # (K, B, H, W, O)
        k, b, h, w, o = out.shape
        y, idx = F.max_pool2d(
            out.view(k * b, h, w, o).permute(0, 3, 1, 2), 2, ceil_mode=True, return_indices=True
        )  # NCHW views of channels-last memory
        ctx.save_for_backward(x, weight, out, y, idx)
        return y.permute(0, 2, 3, 1).contiguous().view(k, b, *y.shape[2:], o)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight, out, y, idx = ctx.saved_tensors
        k, b, h, w, o = out.shape
        gy = gy.contiguous().view(k * b, *y.shape[2:], o).permute(0, 3, 1, 2)
        gp = torch.ops.aten.threshold_backward(gy, y, 0)  # the ReLU's rule, pooled
        if UNPOOL_IN_KERNELS:  # the kernels read the full-size gradient through idx
            pooled = y.shape[2:]
            g = gp.permute(0, 2, 3, 1).contiguous().view(k, b, *pooled, o)
            arg = idx.permute(0, 2, 3, 1).contiguous().view(k, b, *pooled, o)
            dx, dw = _input_and_weight_grads(ctx.needs_input_grad, x, weight, g, arg)
        else:
            g = torch.ops.aten.max_pool2d_with_indices_backward(
                gp, out.view(k * b, h, w, o).permute(0, 3, 1, 2), [2, 2], [2, 2], [0, 0],
                [1, 1], True, idx,
            )  # fmt: skip
            g = g.permute(0, 2, 3, 1).contiguous().view(k, b, h, w, o)
            dx, dw = _input_and_weight_grads(ctx.needs_input_grad, x, weight, g)
        db = gp.reshape(k, b, o, -1).sum(dim=(1, 3)) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def conv3x3_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``max_pool2d(relu(conv3x3(x, weight, bias)), 2, ceil_mode=True)`` per model, with
    autograd (:class:`_ConvReluPool`): (K, B, H, W, C) → (K, B, ⌈H/2⌉, ⌈W/2⌉, O)."""
    _check_inputs(x, weight)
    return _ConvReluPool.apply(x.contiguous(), weight, bias)


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = False
) -> torch.Tensor:
    """K models' 3×3 convolutions (stride 1, padding 1) of their own inputs, with autograd.

    Args:
        x: (K, B, H, W, C) channels-last inputs, model k's batch in ``x[k]``.
        weight: (K, O, C, 3, 3), model k's ``nn.Conv2d`` weight in ``weight[k]``.
        bias: (K, O).
        relu: apply a ReLU to the result, in the same kernel (one pass over the output
            instead of three: the product, the bias add, the ReLU).

    Returns:
        (K, B, H, W, O), channels-last: ``out[k]`` equals
        ``conv2d(x[k] as NCHW, weight[k], bias[k], padding=1)`` in NHWC (then ``relu``).
    """
    _check_inputs(x, weight)
    return _Conv3x3.apply(x.contiguous(), weight, bias, relu)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != torch.float32 and not (INTERPRETED and x.dtype == torch.float64):
        raise ValueError(
            f"conv3x3: float32 inputs (float64 only in Triton's interpreter), got {x.dtype}"
        )
    if x.dim() != 5 or weight.dim() != 5 or weight.shape[-2:] != (3, 3):
        raise ValueError(
            f"conv3x3: x (K, B, H, W, C) and weight (K, O, C, 3, 3), got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if weight.shape[0] != x.shape[0] or weight.shape[2] != x.shape[4]:
        raise ValueError(
            f"conv3x3: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree in models "
            "or input channels"
        )


def _pool(h: torch.Tensor, pool) -> torch.Tensor:
    """A 2-D pooling of (K, B, H, W, C) channels-last activations, channels-last out."""
    k, b, hh, ww, c = h.shape
    out = pool(h.view(k * b, hh, ww, c).permute(0, 3, 1, 2))  # NCHW view of NHWC memory
    return out.permute(0, 2, 3, 1).contiguous().view(k, b, *out.shape[2:], c)


def cnn_forward(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    channels: int,
    layer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (K, n_classes, B) of K registry CNNs (:class:`SmallCNN`), model k on ``x[k]``.

    The network of ``SmallCNN``: per entry of ``channels``, a 3×3 convolution, ReLU and 2×2
    max-pooling (``ceil_mode``), by default :func:`conv3x3_relu_pool`; then adaptive average
    pooling to 2×2, flattening in ``nn.Flatten``'s (c, i, j) order and the Linear layer.
    ``params``: name → (K, ...) as ``torch.func.stack_module_state`` gives them
    (``net.0.weight``, ...); ``x``: (K, B, C, H, W); ``channels``: how many convolutions;
    ``layer``: another f(h, weight, bias) for those three steps (the benchmarks compare).
    """
    import torch.nn.functional as F

    layer = layer or conv3x3_relu_pool
    h = x.permute(0, 1, 3, 4, 2).contiguous()  # (K, B, H, W, C)
    for i in range(channels):
        h = layer(h, params[f"net.{3 * i}.weight"], params[f"net.{3 * i}.bias"])
    k, b = h.shape[:2]
    h = _pool(h, lambda t: F.adaptive_avg_pool2d(t, 2))  # (K, B, 2, 2, C)
    h = h.permute(0, 1, 4, 2, 3).reshape(k, b, -1)  # (K, B, C·4), c·4 + i·2 + j
    head = f"net.{3 * channels + 2}"
    logits = torch.baddbmm(
        params[f"{head}.bias"].unsqueeze(1), h, params[f"{head}.weight"].transpose(1, 2)
    )
    return logits.transpose(1, 2)
