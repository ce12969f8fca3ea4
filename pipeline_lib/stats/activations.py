"""Layer-input activation statistics (algorithms.md §5; Kodge, Saha, Roy, TMLR 2024).

For every projected layer (Linear, Conv2d; for a ViT the inputs of query/key/value, the
attention output projection and both MLP layers, :func:`projection_layers`) the *input* activations of a set of samples
form a matrix A (rows × d): a Linear layer contributes one row per sample (one per token for
a ViT), a Conv2d layer one row per output position (its unfolded input patch, C·k_h·k_w
wide). Its SVD A = V Σ Wᵀ gives the basis U = W of the activation space and the singular
values S = diag(Σ).

A itself grows with the number of samples; its Gram matrix G = AᵀA (d × d) does not, and it
sums over batches and shards exactly: G = Σ_shards Σ_batches A_bᵀ A_b. The eigenvectors of G
are U and its eigenvalues S² (:func:`decompose_grams`), so memory stays flat in the number
of samples (one batch of activations plus d² per layer). :func:`stacked_activations` is the
obvious reference (A materialised, then SVD) the fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Class name of a transformer block of transformers' ViT (``ViTLayer``): every Linear inside
#: one (query, key, value, attention output projection, both MLP layers) is projected.
VIT_BLOCK = "ViTLayer"


def projection_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose input space is projected, by module name.

    A Vision Transformer (a model with ``ViTLayer`` blocks) contributes, per block, the inputs
    of query, key, value, the attention output projection and both MLP linears, as the paper
    does for ViT (patch embedding and classifier head are left alone); any other model all
    its Linear and Conv2d layers."""
    named = dict(model.named_modules())
    blocks = [n for n, m in named.items() if type(m).__name__ == VIT_BLOCK]
    if blocks:
        return {
            n: m
            for n, m in named.items()
            if isinstance(m, nn.Linear) and any(n.startswith(b + ".") for b in blocks)
        }
    out: dict[str, nn.Module] = {}
    for n, m in named.items():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ValueError(f"layer {n}: only groups=1, zero, numeric padding is supported")
            out[n] = m
        elif isinstance(m, nn.Linear):
            out[n] = m
    return out


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input rows of ``module`` for input ``x``: Linear (…, d) → (rows, d); Conv2d
    (B, C, H, W) → unfolded patches (B·L, C·k_h·k_w), in the order of ``weight.flatten(1)``."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (B, C·k·k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


@contextmanager
def _capture(layers: dict[str, nn.Module], sink: Callable[[str, nn.Module, torch.Tensor], None]):
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: sink(name, mod, args[0]))
        for name, m in layers.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_grams(
    model: nn.Module,
    X: torch.Tensor,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ AᵀA per projected layer ({layer name: (d, d) in ``dtype``}) over the samples X
    (N, *shape), and N. One forward pass in eval mode; memory independent of N."""
    layers = projection_layers(model)
    grams: dict[str, torch.Tensor] = {}
    # ViT query/key/value read the same tensor: one product serves all three Linear layers.
    # The entry holds the tensor itself, so its id cannot be reused within the batch.
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def sink(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if isinstance(module, nn.Linear) and id(x) in shared:
            g = shared[id(x)][1]
        else:
            r = layer_rows(module, x).to(dtype)
            g = r.T @ r
            if isinstance(module, nn.Linear):
                shared[id(x)] = (x, g)
        grams[name] = grams[name] + g if name in grams else g.clone()

    model.eval()
    device = next(model.parameters()).device
    with _capture(layers, sink):
        for start in range(0, len(X), batch_size):
            shared.clear()
            model(X[start : start + batch_size].to(device))
    shared.clear()
    return {k: v.cpu() for k, v in grams.items()}, len(X)


@torch.no_grad()
def stacked_activations(model: nn.Module, X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: the full activation matrix A ({layer: (rows, d)}) of X, materialised."""
    layers = projection_layers(model)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    model.eval()
    with _capture(layers, lambda name, m, x: rows[name].append(layer_rows(m, x).clone())):
        model(X)
    return {n: torch.cat(r) for n, r in rows.items()}


def retain_grams_from_full(
    full_grams: dict[str, torch.Tensor],
    n_full: int,
    forget_grams: dict[str, torch.Tensor],
    n_forget: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """(G_R, |R|) with G_R = G_D − G_F per layer, in float64, from a model version's
    full-data Gram sums (D: N samples) and the forget set's (F ⊂ D, |F| samples).

    Exact for sums: a sample's activation rows do not depend on which other samples are in
    the batch (eval mode), so Σ_{x∈D} AᵀA − Σ_{x∈F} AᵀA = Σ_{x∈R} AᵀA up to floating-point
    reassociation. The result is symmetrised ((G + Gᵀ)/2) so that rounding cannot make it
    asymmetric before :func:`decompose_gram`; negative eigenvalues from cancellation are
    clamped there."""
    n_r = int(n_full) - int(n_forget)
    if n_r <= 0:
        raise ValueError(
            f"retain_grams_from_full: {n_forget} forget samples of {n_full}: no retain set"
        )
    if full_grams.keys() != forget_grams.keys():
        raise ValueError("retain_grams_from_full: full and forget Grams cover different layers")
    out = {}
    for k, g in full_grams.items():
        d = g.double() - forget_grams[k].double()
        out[k] = (d + d.T) / 2
    return out, n_r


def decompose_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (d, d), S (d,)) with G = U diag(S²) Uᵀ, S descending, S = sqrt(max(eigenvalue, 0)):
    the left factor and singular values of any A with AᵀA = G."""
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    return evecs[:, order], evals[order].clamp_min(0).sqrt()


def decompose_grams(grams: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{``<layer>.U``: (d, d), ``<layer>.S``: (d,)} for every layer's Gram matrix."""
    out = {}
    for name, g in grams.items():
        u, s = decompose_gram(g)
        out[f"{name}.U"], out[f"{name}.S"] = u, s
    return out


def activation_shard_grams(
    model: nn.Module, shard: str | Path, batch_size: int, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], int]:
    """Partial Gram sums of one Parquet shard (:mod:`pipeline_lib.stats.store`). The model computes
    in ``dtype`` (a copy when it differs); the Gram matrices accumulate in float64."""
    from pipeline_lib.stats.store import read_shard, with_dtype

    _, X, _ = read_shard(shard)
    model = with_dtype(model, dtype)
    grams, n = activation_grams(model, torch.from_numpy(X).to(dtype), batch_size, torch.float64)
    return grams, n


def summary(grams: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Layer name → width d (for logs and configs)."""
    return {k: int(v.shape[0]) for k, v in grams.items()}
