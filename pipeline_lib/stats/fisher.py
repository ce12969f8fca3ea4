"""Per-sample Fisher-information diagonal (algorithms.md §1; DeepClean, arXiv 2311.10448).

I_S(θ_i) = E_{x∈S} E_{y} [(∂ log p_θ(y|x) / ∂θ_i)²]

The expectation over x needs *per-sample* gradients: squaring a batch gradient gives a
different, biased quantity. The fast path vectorises per-sample gradients with
``torch.func.vmap(grad(...))``; :func:`fisher_diagonal_reference` is the obvious Python loop
it is tested against (float64, 1e-6).

Kinds of y:
- ``true_expected`` (default): Σ_c p_θ(c|x) (∂ log p_θ(c|x))², the exact true Fisher, no noise.
- ``true_sampled``: one y ~ p_θ(·|x) per sample (Monte-Carlo true Fisher), seeded. With
  ``sample_ids`` the draw of each sample is keyed by (seed, its id) (:func:`id_uniforms`), so
  the result does not depend on which other samples are in the call: sharded sums equal the
  unsharded one (:mod:`pipeline_lib.stats.store`). Without ids one generator draws for the set.
- ``empirical``: the dataset label.
- ``batch_squared``: not a per-sample kind. The squared gradient of the *batch-mean* loss
  (cross-entropy with the dataset labels), accumulated over consecutive batches of
  ``batch_size`` in the order given: the importance estimate of SSD's reference code
  (Foster, Schoepf, Brintrup, AAAI 2024, github.com/if-loops/selective-synaptic-dampening,
  ``calc_importance``: ``imp += p.grad ** 2`` per batch, divided by the number of batches).
  Here each batch's square is weighted by its size and the sum divided by N, which is the
  same mean over batches when they are equal in size. One backward pass per batch instead of
  one per sample (and per class): far cheaper, but biased, since mixed batches cancel: it
  equals ``empirical`` with ``batch_size=1`` only. Its sums are not additive over samples, so
  Σ_R ≠ Σ_D − Σ_F and it depends on the order and the batch size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline_lib.training.fit import predict_logits

KINDS = ("true_expected", "true_sampled", "empirical", "batch_squared")
#: Kinds whose sums add over samples (Σ_R = Σ_D − Σ_F, any sharding).
PER_SAMPLE_KINDS = ("true_expected", "true_sampled", "empirical")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"fisher kind {kind!r} unknown; valid: {', '.join(KINDS)}")


def id_uniforms(sample_ids: Sequence[str], seed: int) -> np.ndarray:
    """One uniform number in [0, 1) per sample id (N,) float64, a pure function of
    (seed, id): sha256 of ``"{seed}|{id}"``, first 53 bits."""
    out = np.empty(len(sample_ids), dtype=np.float64)
    for i, sid in enumerate(sample_ids):
        word = int.from_bytes(hashlib.sha256(f"{seed}|{sid}".encode()).digest()[:8], "big")
        out[i] = (word >> 11) / float(1 << 53)
    return out


def fisher_targets(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    seed: int,
    sample_ids: Sequence[str] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per-sample targets and class probabilities.

    Returns (targets (N,) or None for ``true_expected``, probs (N, C)). Sampled labels are
    drawn for the whole set at once so the result does not depend on the batch size; with
    ``sample_ids`` (N ids) each label is the inverse CDF of p_θ(·|x) at that id's
    :func:`id_uniforms` value, so it does not depend on the other samples either.
    """
    _check_kind(kind)
    if sample_ids is not None and len(sample_ids) != len(X):
        raise ValueError(f"fisher_targets: {len(sample_ids)} sample ids for {len(X)} samples")
    probs = predict_logits(model, X).to(X.dtype).softmax(-1)
    if kind in ("empirical", "batch_squared"):
        return y.long(), probs
    if kind == "true_sampled":
        if len(X) == 0:
            return torch.empty(0, dtype=torch.long), probs
        if sample_ids is not None:
            u = torch.from_numpy(id_uniforms(sample_ids, seed)).unsqueeze(1)
            below = (probs.double().cumsum(1) <= u).sum(1)
            return below.clamp(max=probs.shape[1] - 1), probs
        gen = torch.Generator().manual_seed(seed)
        return torch.multinomial(probs.double(), 1, generator=gen).squeeze(1), probs
    return None, probs


def fisher_diagonal_sum(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    kind: str = "true_expected",
    batch_size: int = 256,
    seed: int = 0,
    sample_ids: Sequence[str] | None = None,
    sum_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over samples of the squared per-sample gradients, and the sample count.

    ``X``: (N, *shape), ``y``: (N,). Returns ({param name: tensor of the param's shape}, N).
    Sums (not means) so shards can be added exactly before one division. ``sum_dtype``: the
    dtype the sums accumulate in (default: the parameters'); float64 for the full-data sums
    a per-request I_R is derived from by subtraction (:func:`pipeline_lib.stats.store.retain_from_full`).
    """
    targets, probs = fisher_targets(model, X, y, kind, seed, sample_ids)
    model.eval()
    device = next(model.parameters()).device
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def neg_log_prob(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return -logits.log_softmax(-1)[0].gather(0, t.unsqueeze(0)).squeeze(0)

    per_sample_grad = vmap(grad(neg_log_prob), in_dims=(None, 0, 0))
    sums = {k: torch.zeros_like(v, dtype=sum_dtype) for k, v in params.items()}
    if kind != "batch_squared" and _layerwise_ok(model):
        return _layerwise_sums(model, X, targets, probs, batch_size, sums), len(X)
    if kind == "batch_squared":
        assert targets is not None

        def batch_loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor):
            logits = functional_call(model, (p, buffers), (x,))
            return nn.functional.cross_entropy(logits, t)

        batch_grad = grad(batch_loss)
        for start in range(0, len(X), batch_size):
            xb = X[start : start + batch_size].to(device)
            g = batch_grad(params, xb, targets[start : start + batch_size].to(device))
            for k in sums:
                sums[k] += (len(xb) * g[k].square()).to(sums[k].dtype)
        return sums, len(X)
    n_classes = probs.shape[1]
    for start in range(0, len(X), batch_size):
        xb = X[start : start + batch_size].to(device)
        if targets is not None:
            g = per_sample_grad(params, xb, targets[start : start + batch_size].to(device))
            for k in sums:
                sums[k] += g[k].square().sum(0).to(sums[k].dtype)
            continue
        pb = probs[start : start + batch_size].to(device)
        # One vmapped pass per class keeps memory at B × |θ| instead of B × C × |θ|.
        for c in range(n_classes):
            t = torch.full((len(xb),), c, dtype=torch.long, device=device)
            g = per_sample_grad(params, xb, t)
            w = pb[:, c]
            for k in sums:
                sums[k] += torch.einsum("b,b...->...", w, g[k].square()).to(sums[k].dtype)
    return sums, len(X)


def _layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def _layerwise_ok(model: nn.Module) -> bool:
    """The layer-wise path applies when every parameter is the weight or bias of a Linear or
    a zero-padded, ungrouped Conv2d (MLP, CNN); anything else (a ViT's LayerNorm, embeddings)
    takes the vmap path."""
    if any(getattr(m, "inplace", False) for m in model.modules()):
        return False  # an in-place activation would overwrite a layer output we take δ at
    covered = set()
    for name, m in _layer_modules(model).items():
        if isinstance(m, nn.Conv2d) and (
            m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
        ):
            return False
        covered.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters())
    return covered == {k for k, _ in model.named_parameters()}


def _layerwise_sums(
    model: nn.Module,
    X: torch.Tensor,
    targets: torch.Tensor | None,
    probs: torch.Tensor,
    batch_size: int,
    sums: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Σ over samples of squared per-sample gradients, layer by layer, without per-sample
    parameter gradients of the whole model: the per-sample gradient of a Linear weight is
    δ_i a_iᵀ (δ_i: the gradient of the sample's log-probability at the layer's output, a_i:
    its input), of a Conv2d weight δ_i U(a_i)ᵀ with U the unfolded input patches, of a bias
    Σ δ_i. One forward per batch, then one backward per target (``true_expected``: per class,
    weighted by p_θ(c|x); otherwise the sample's own target), taking δ for every layer at
    once. Samples are independent in eval mode, so the gradient of the batch's summed
    log-probability at a sample's output row is that sample's δ. Equal to the vmap path up
    to rounding (tested against :func:`fisher_diagonal_reference`)."""
    layers = _layer_modules(model)
    device = next(model.parameters()).device
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def f(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in seen:
                raise RuntimeError(f"layer {name} is applied twice in one forward pass")
            seen[name] = (args[0].detach(), out)

        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for start in range(0, len(X), batch_size):
            # the input carries the graph, so δ exists whatever the parameters' requires_grad
            xb = X[start : start + batch_size].to(device).requires_grad_(True)
            seen.clear()
            with torch.enable_grad():
                logp = model(xb).log_softmax(-1)
                outs = [seen[n][1] for n in layers]
                if targets is not None:
                    rows = torch.arange(len(xb), device=device)
                    t = targets[start : start + batch_size].to(device)
                    plan = [(logp[rows, t].sum(), None)]
                else:
                    pb = probs[start : start + batch_size].to(device)
                    plan = [(logp[:, c].sum(), pb[:, c]) for c in range(logp.shape[1])]
                # each layer's input term, once per batch (not once per class)
                inputs = {n: _layer_input(m, seen[n][0]) for n, m in layers.items()}
                for i, (obj, w) in enumerate(plan):
                    deltas = torch.autograd.grad(obj, outs, retain_graph=i < len(plan) - 1)
                    for (name, m), d in zip(layers.items(), deltas, strict=True):
                        _add_layer(sums, name, m, inputs[name], d, w)
    finally:
        for h in handles:
            h.remove()
    return sums


def _layer_input(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """What :func:`_add_layer` needs of layer ``m``'s input ``a`` (B, …): the unfolded input
    patches (B, C·k·k, L) of a Conv2d, a² of a Linear on (B, in), the (B, positions, in)
    view of a Linear on tokens. It does not depend on the target, so it is formed once per
    batch and shared by the per-class passes of ``true_expected``."""
    if isinstance(m, nn.Conv2d):
        return nn.functional.unfold(
            a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride
        )
    if a.dim() == 2:
        return a.square()
    return a.reshape(len(a), -1, a.shape[-1])


def _add_layer(
    sums: dict[str, torch.Tensor],
    name: str,
    m: nn.Module,
    a: torch.Tensor,
    d: torch.Tensor,
    w: torch.Tensor | None,
) -> None:
    """Add Σ_i w_i (per-sample gradient of sample i)² of layer ``m`` to ``sums``; ``a``: its
    input as :func:`_layer_input` forms it, ``d``: δ at its output, ``w``: per-sample
    weights (None: 1)."""
    b = len(d)
    if isinstance(m, nn.Conv2d):  # a: unfolded patches (B, C·k·k, L)
        d = d.reshape(b, d.shape[1], -1)  # (B, out, L)
        gw = torch.bmm(d, a.transpose(1, 2))  # (B, out, C·k·k)
        gb = d.sum(2) if m.bias is not None else None
    elif a.dim() == 2:  # a: the input squared, (B, in)
        gw = None  # δ aᵀ squared is δ² (a²)ᵀ: one matmul, no per-sample matrices
        gb = d if m.bias is not None else None
    else:  # tokens: a (B, positions, in) → per-sample Σ over positions
        d = d.reshape(b, -1, d.shape[-1])
        gw = torch.bmm(d.transpose(1, 2), a)  # (B, out, in)
        gb = d.sum(1) if m.bias is not None else None
    prefix = f"{name}." if name else ""
    weight = m.weight
    if gw is None:
        dd = d.square() if w is None else d.square() * w.unsqueeze(1)
        sq = dd.T @ a
    else:
        g2 = gw.square()
        sq = g2.sum(0) if w is None else torch.einsum("b,b...->...", w, g2)
    sums[prefix + "weight"] += sq.reshape(weight.shape).to(sums[prefix + "weight"].dtype)
    if gb is not None:
        b2 = gb.square()
        bsq = b2.sum(0) if w is None else torch.einsum("b,b...->...", w, b2)
        sums[prefix + "bias"] += bsq.to(sums[prefix + "bias"].dtype)


def fisher_diagonal(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    kind: str = "true_expected",
    batch_size: int = 256,
    seed: int = 0,
    sample_ids: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The Fisher diagonal I_S (mean over the N samples of (X, y)); see module docstring."""
    if len(X) == 0:
        raise ValueError("fisher_diagonal: empty sample set")
    sums, n = fisher_diagonal_sum(model, X, y, kind, batch_size, seed, sample_ids)
    return {k: v / n for k, v in sums.items()}


def fisher_diagonal_reference(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    kind: str = "true_expected",
    seed: int = 0,
    sample_ids: Sequence[str] | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Slow, obviously-correct reference: one autograd backward per sample (and class);
    ``batch_squared``: one per batch of ``batch_size``."""
    targets, probs = fisher_targets(model, X, y, kind, seed, sample_ids)
    model.eval()
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(v) for k, v in named.items()}
    if kind == "batch_squared":
        for start in range(0, len(X), batch_size):
            model.zero_grad(set_to_none=True)
            xb, tb = X[start : start + batch_size], y[start : start + batch_size].long()
            nn.functional.cross_entropy(model(xb), tb).backward()
            for k, p in named.items():
                acc[k] += len(xb) * p.grad.detach().square()
        model.zero_grad(set_to_none=True)
        return {k: v / len(X) for k, v in acc.items()}
    for i in range(len(X)):
        classes = range(probs.shape[1]) if targets is None else [int(targets[i])]
        for c in classes:
            weight = probs[i, c] if targets is None else 1.0
            model.zero_grad(set_to_none=True)
            log_p = model(X[i : i + 1]).log_softmax(-1)[0, c]
            log_p.backward()
            for k, p in named.items():
                acc[k] += weight * p.grad.detach().square()
    model.zero_grad(set_to_none=True)
    return {k: v / len(X) for k, v in acc.items()}


def total_entries(stats: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in stats.values())
