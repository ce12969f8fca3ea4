"""Influence of forget documents on held-out prompts (algorithms.md §3, point 4: "influence
scores (Hessian-vector products; activation·gradient dot products) quantify how much each
forget sequence still affects the model").

For a forget document f and a held-out prompt h, with g_x = ∇θ L(x) the gradient of the mean
next-token loss restricted to the chosen parameters θ:

- ``grad_dot``: g_h · g_f (one-checkpoint TracIn: how much a gradient step on f changes
  the loss on h);
- ``hvp``: g_hᵀ (H + λI)⁻¹ g_f (influence function, Koh & Liang 2017: the first-order change
  of the loss on h when f is removed, up to 1/n), with H the Hessian of the training loss on
  a sample of training windows. (H + λI)⁻¹ g_h is solved by conjugate gradient using
  Hessian-vector products through ``torch.func`` (``jvp`` of ``grad``); H of a non-convex
  model can be indefinite, so λ (damping) and a fixed number of CG steps are parameters
  and the residual is reported.

Per forget document the score is averaged over prompts; a model that forgot f should show
scores near the oracle's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from pipeline_lib.models.lm import IGNORE, Windows, select_parameters


def _loss(model: nn.Module, params: dict, inputs: torch.Tensor, labels: torch.Tensor):
    logits = functional_call(model, params, args=(), kwargs={"input_ids": inputs}).logits[:, :-1]
    target = labels[:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE
    )


def _flat(d: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1) for n in names])


def _unflat(v: torch.Tensor, like: dict[str, torch.Tensor], names: Sequence[str]) -> dict:
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = v[i : i + k].view_as(like[n])
        i += k
    return out


def doc_gradients(model: nn.Module, win: Windows, names: Sequence[str]) -> torch.Tensor:
    """(n_docs, P) gradients of every document's mean token loss over its windows."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
    g_fn = grad(lambda p, x, y: _loss(model, p, x, y))
    rows = []
    for d in range(win.n_docs):
        sel = win.doc == d
        rows.append(_flat(g_fn(params, win.inputs[sel], win.labels[sel]), names))
    return torch.stack(rows)


def conjugate_gradient(
    hvp, b: torch.Tensor, damping: float, steps: int
) -> tuple[torch.Tensor, float]:
    """Solve (H + damping·I) x = b with ``steps`` CG iterations; returns x and the relative
    residual |b − (H+λI)x| / |b|."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(steps):
        Ap = hvp(p) + damping * p
        denom = p @ Ap
        if denom.abs() < 1e-30:
            break
        alpha = rs / denom
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r @ r
        if rs_new.sqrt() < 1e-10:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    res = b - (hvp(x) + damping * x)
    return x, float(res.norm() / b.norm().clamp_min(1e-30))


def influence_scores(
    model: nn.Module,
    forget: Windows,
    prompts: Windows,
    hessian_windows: Windows | None,
    kind: str = "grad_dot",
    parameters: str = "embedding",
    damping: float = 0.01,
    cg_steps: int = 10,
) -> dict[str, np.ndarray | float]:
    """Scores (n_forget_docs,) averaged over the prompts (see module docstring)."""
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # torch.func differentiates the dicts passed, nothing else
        p.requires_grad_(False)
    # forward-mode AD (the HVPs) is not implemented for the fused CPU attention kernel
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        return _influence(
            model, forget, prompts, hessian_windows, kind, parameters, damping, cg_steps
        )
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        if attn is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)


def _influence(model, forget, prompts, hessian_windows, kind, parameters, damping, cg_steps):
    names = select_parameters(model, parameters)
    g_f = doc_gradients(model, forget, names)  # (F, P)
    g_h = doc_gradients(model, prompts, names)  # (H, P)
    if kind == "grad_dot":
        return {"scores": (g_f @ g_h.T).mean(1).double().numpy(), "cg_residual": 0.0}
    if kind != "hvp":
        raise ValueError(f"unknown influence kind {kind!r}; valid: grad_dot, hvp")
    if hessian_windows is None:
        raise ValueError("hvp influence needs training windows for the Hessian")
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
    x, y = hessian_windows.inputs, hessian_windows.labels
    g_fn = grad(lambda p: _loss(model, p, x, y))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        _, hv = jvp(g_fn, (params,), (_unflat(v, params, names),))
        return _flat(hv, names)

    solved, residuals = [], []
    for h in range(len(g_h)):
        s, res = conjugate_gradient(hvp, g_h[h], damping, cg_steps)
        solved.append(s)
        residuals.append(res)
    ihvp = torch.stack(solved)  # (H, P)
    return {
        "scores": (g_f @ ihvp.T).mean(1).double().numpy(),
        "cg_residual": float(np.mean(residuals)),
    }
