"""Train K models of one architecture at once, each on its own subset (vectorised ensemble).

Subset-model methods (datamodels, KLoM oracles, SISA-style shards) train many small models of
the same architecture on different subsets of one dataset. Training them one after another
leaves a small model's step dominated by Python and kernel-launch overhead; here the K models'
parameters are stacked along a leading model axis, (K, *param_shape), and one step runs all
of them with batched kernels: the registry MLP by hand-batched ``baddbmm`` layers (the fast
path, :func:`_mlp_forward`), any other architecture (the CNN) by ``torch.func.vmap`` over
``torch.func.functional_call``.

Equivalence (the contract): model k trained here equals, to float rounding,

    fit(build_model(cfg, shape, n_classes, seeds[k]), X[masks[k]], y[masks[k]], settings, seeds[k])

because every ingredient of :func:`pipeline_lib.training.fit.fit` is reproduced per model:

- init: ``build_model(..., seeds[k])`` (cast to X's dtype);
- data order: one ``torch.Generator().manual_seed(seeds[k])`` per model, one
  ``torch.randperm(n, generator=g)`` per epoch, batches ``order[s : s + batch_size]``
  including the last partial batch. All subsets have the same size n, so all models have the
  same batch sizes at every step and can be stepped together;
- loss: cross-entropy *mean over the model's own batch*. The ensemble minimises
  Σ_k mean_k, whose gradient with respect to model k's parameters is exactly that model's
  own gradient (the models share no parameters);
- optimizer: the same ``torch.optim`` Adam/SGD with the hyper-parameters of
  :func:`pipeline_lib.training.fit._optimizer` (momentum, weight decay), here over the stacked
  (K, ...) leaves. Both update rules are elementwise and their step counters advance
  together for all models, so one optimizer over stacked leaves is K independent optimizers
  (the fused kernel is used; it matches the unfused one to rounding).

:func:`train_ensemble_reference` is the slow, obviously-correct path (a Python loop of
``fit``) and :func:`ensemble_logits_reference` that of :func:`ensemble_logits`
(``predict_logits`` per model); the tests compare them in float64 (max |Δ| ≈ 1e-16 after three
epochs of Adam; asserted at 1e-12).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from pipeline_lib.models.image import MLP, ModelConfig, build_model
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers


def _check_inputs(
    X: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, seeds: Sequence[int]
) -> int:
    """Validate shapes; return n, the common number of samples per model."""
    if masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError(
            f"masks must be a (K, N) bool tensor, got dtype {masks.dtype} shape {tuple(masks.shape)}"
        )
    if masks.shape[1] != len(X):
        raise ValueError(f"masks has {masks.shape[1]} columns but X has {len(X)} rows")
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    k = masks.shape[0]
    if k == 0:
        raise ValueError("masks has no rows: need at least one model")
    if len(seeds) != k:
        raise ValueError(f"masks has {k} rows (models) but {len(seeds)} seeds were given")
    counts = masks.sum(1).tolist()
    if len(set(counts)) != 1:
        shown = counts if k <= 20 else [*counts[:20], "..."]
        raise ValueError(
            f"every row of masks must select the same number of samples (the models step together); got counts per row {shown} (distinct: {sorted(set(counts))})"
        )
    if counts[0] == 0:
        raise ValueError("train_ensemble: empty training set (masks select no sample)")
    return int(counts[0])


def _stacked_optimizer(params: list[torch.Tensor], s: FitSettings) -> torch.optim.Optimizer:
    """The optimizer of :func:`pipeline_lib.training.fit._optimizer`, over (K, ...) leaves.

    Same hyper-parameters; ``fused=True`` (one pass over memory per step) because with K
    models the unfused Adam's many full-size temporaries cost as much as the matmuls.
    Fused and unfused agree to rounding (checked against ``fit`` in the tests).
    """
    fused = params[0].device.type in ("cpu", "cuda") or None
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, fused=fused)
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, fused=fused
        )
    raise ValueError(f"unknown optimizer {s.optimizer!r}; valid: adam, sgd")


_Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def _mlp_plan(base: nn.Module) -> list[tuple[str, str, bool]] | None:
    """(weight name, bias name, ReLU after?) per Linear of a registry MLP, else None.

    None sends the architecture to the generic vmap path.
    """
    if not isinstance(base, MLP):
        return None
    mods = list(base.net)
    if not mods or not isinstance(mods[0], nn.Flatten):
        return None
    plan: list[list] = []
    for i, m in enumerate(mods[1:], start=1):
        if isinstance(m, nn.Linear) and m.bias is not None:
            plan.append([f"net.{i}.weight", f"net.{i}.bias", False])
        elif isinstance(m, nn.ReLU) and plan and not plan[-1][2]:
            plan[-1][2] = True
        else:
            return None
    return [(w, b, relu) for w, b, relu in plan]


def _mlp_forward(plan: list[tuple[str, str, bool]]) -> _Forward:
    """Hand-batched MLP: f(params {name: (K, ...)}, x (K, B, *shape)) -> logits (K, C, B).

    Activations are kept feature-major, (K, features, B), so each layer is one
    ``baddbmm(bias, W (K, out, in), h (K, in, B))``: the weight gradient g @ hᵀ then comes
    out (K, out, in)-contiguous like the parameter and autograd accumulates it without a
    copy (the batch-major x @ Wᵀ form, which is what vmap over ``nn.Linear`` runs, yields a
    transposed gradient that costs a full copy of every weight per step), and the bias add
    happens inside the same call (beta = 1).
    """

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2).transpose(1, 2)  # (K, D, B)
        for w, b, relu in plan:
            h = torch.baddbmm(params[b].unsqueeze(-1), params[w], h)
            if relu:
                h = h.relu_()  # in place: baddbmm's backward does not need its output
        return h

    return forward


def _vmap_forward(base: nn.Module) -> _Forward:
    """Any architecture: f(params {name: (K, ...)}, x (K, B, *shape)) -> logits (K, C, B)."""

    def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (x,))

    batched = vmap(one, in_dims=(0, 0))

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return batched(params, x).transpose(1, 2)

    return forward


def _epoch_orders(gens: list[torch.Generator], n: int) -> torch.Tensor:
    """(K, n): this epoch's ``randperm(n)`` of each model, from each model's own generator."""
    return torch.stack([torch.randperm(n, generator=g) for g in gens])


# --------------------------------------------------------------------------- fast path


def train_ensemble(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    X: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FitSettings,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Train K models at once; model k sees only ``X[masks[k]]``.

    Args:
        X: (N, *shape) inputs, floating point; the models are cast to ``X.dtype``.
        y: (N,) int64 labels.
        masks: (K, N) bool; every row must select the same number n of samples.
        seeds: K seeds; model k is initialised by ``build_model(..., seeds[k])`` and shuffled
            by ``torch.Generator().manual_seed(seeds[k])``, exactly as :func:`fit` does.
        settings: epochs, batch size, optimizer; shared by all models.
        device: where to train (default CPU).

    Returns:
        Stacked state dict on CPU: parameter name -> (K, *param_shape); ``unstack(sd, k)``
        is the state dict of model k.

    Raises:
        ValueError: masks/seeds/X/y disagree in shape, rows of ``masks`` select different
            numbers of samples (the counts are named), a subset is empty, or the optimizer
            name is unknown.
    """
    n = _check_inputs(X, y, masks, seeds)
    k = masks.shape[0]
    device = device or torch.device("cpu")
    dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()

    models = [build_model(model_cfg, shape, n_classes, s).to(device, dtype) for s in seeds]
    if any(True for _ in models[0].buffers()):
        raise ValueError("train_ensemble: models with buffers (e.g. BatchNorm) are not supported")
    params, _ = stack_module_state(models)  # name -> (K, ...) leaves with requires_grad
    base = copy.deepcopy(models[0]).to("meta")
    del models
    plan = _mlp_plan(base)
    forward = _mlp_forward(plan) if plan is not None else _vmap_forward(base)
    opt = _stacked_optimizer(list(params.values()), settings)

    Xd = X.to(device, dtype)
    yd = y.to(device)
    # masks.nonzero() is row-major, so row k's columns come out ascending: the same order as
    # X[masks[k]] in the reference, which each epoch's permutation then indexes into.
    subset = masks.cpu().nonzero()[:, 1].view(k, n)  # (K, n), on CPU like the permutations
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    bs = settings.batch_size
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        idx = subset.gather(1, _epoch_orders(gens, n)).to(device)  # (K, n) rows of X
        total = torch.zeros((), dtype=dtype, device=device)
        for start in range(0, n, bs):
            ib = idx[:, start : start + bs]  # (K, b); b < bs for the last partial batch
            b = ib.shape[1]
            # one gather of all K batches; index_select is ~4x faster than Xd[ib] on CPU
            flat = ib.reshape(-1)
            xb = Xd.index_select(0, flat).view(k, b, *Xd.shape[1:])  # (K, b, *shape)
            yb = yd.index_select(0, flat).view(k, b)  # (K, b)
            opt.zero_grad(set_to_none=True)
            logits = forward(params, xb)  # (K, C, b)
            # Σ_k mean_k: the gradient for model k is its own mean-loss gradient
            loss = nn.functional.cross_entropy(logits, yb, reduction="sum") / b
            loss.backward()
            opt.step()
            total += loss.detach() * b
        log.info(
            "epoch %d/%d mean loss over %d models %.4f (%.1fs)",
            epoch + 1,
            settings.epochs,
            k,
            float(total) / (n * k),
            time.perf_counter() - t0,
        )
    return {name: p.detach().cpu() for name, p in params.items()}


@torch.no_grad()
def ensemble_logits(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    stacked: dict[str, torch.Tensor],
    X: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Logits (K, T, n_classes) on CPU of every model for X (T, *shape); eval mode, no grad.

    Runs on the device of ``stacked``; X is cast to its dtype.
    """
    first = next(iter(stacked.values()))
    k, device, dtype = first.shape[0], first.device, first.dtype
    base = build_model(model_cfg, shape, n_classes, 0).to("meta", dtype).eval()

    def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, params, (x,))

    forward = vmap(one, in_dims=(0, None))  # X shared by all models
    if len(X) == 0:
        return torch.empty(k, 0, n_classes, dtype=dtype)
    out = [
        forward(stacked, X[i : i + batch_size].to(device, dtype)).cpu()
        for i in range(0, len(X), batch_size)
    ]
    return torch.cat(out, dim=1)


def unstack(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """State dict of model k: name -> (*param_shape), for ``model.load_state_dict``."""
    return {name: t[k] for name, t in stacked.items()}


# --------------------------------------------------------------------------- reference


def train_ensemble_reference(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    X: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FitSettings,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Slow reference of :func:`train_ensemble`: K calls of :func:`fit`, one model at a time.

    Same arguments and result ((K, *param_shape) per name, on CPU).
    """
    _check_inputs(X, y, masks, seeds)
    dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()
    states = []
    for mask, seed in zip(masks, seeds, strict=True):
        model = build_model(model_cfg, shape, n_classes, seed).to(dtype)
        fit(model, X[mask], y[mask], settings, seed, device=device)
        states.append({n: p.detach().cpu() for n, p in model.named_parameters()})
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


def ensemble_logits_reference(
    model_cfg: ModelConfig,
    shape: tuple[int, ...],
    n_classes: int,
    stacked: dict[str, torch.Tensor],
    X: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Slow reference of :func:`ensemble_logits`: :func:`predict_logits` per model, (K, T, C)."""
    first = next(iter(stacked.values()))
    out = []
    for k in range(first.shape[0]):
        model = build_model(model_cfg, shape, n_classes, 0).to(first.device, first.dtype)
        model.load_state_dict(unstack(stacked, k))
        out.append(predict_logits(model, X.to(first.dtype), batch_size))
    return torch.stack(out)


# --------------------------------------------------------------------------- FLOPs


def train_step_flops(
    model_cfg: ModelConfig, shape: tuple[int, ...], n_classes: int, batch_size: int
) -> float:
    """Forward+backward FLOPs of ONE model on one batch of ``batch_size`` samples.

    Counted from the Linear and Conv2d layers only (bias adds, activations, pooling and the
    loss are ignored): forward multiply-adds M per sample, FLOPs = 2 · M (a multiply-add is 2
    FLOPs) · 3 (backward ≈ twice the forward: input- and weight-gradient) · batch_size.
    Conv output sizes are read from one traced forward of a single zero sample.
    """
    model = build_model(model_cfg, shape, n_classes, 0)
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_out = (module.in_channels // module.groups) * kh * kw
            macs += out[0].numel() * per_out  # out[0]: (C_out, H_out, W_out) of the one sample

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        for h in hooks:
            h.remove()
    return float(2 * 3 * macs * batch_size)
