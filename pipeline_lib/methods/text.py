"""Unlearning methods for causal language models, in their own registry (``LM_METHODS``).

Same signature as the image registry (:mod:`pipeline_lib.methods`)::

    fn(model, inputs: LMUnlearnInputs, params, seed) -> (model, info)

- ``gradient_ascent``: first-epoch gradient ascent with calibration (Zagardo, "Practical
  machine unlearning: first-epoch gradient ascent", arXiv 2406.09391; algorithms.md §3).
- ``neggrad_plus``: β·CE(retain) − (1−β)·CE(forget) (Kurmanji et al. 2023), on documents.
- ``retrain``: train from scratch on the retain documents (the oracle, exact answer).

Each method's params section (``unlearn.<name>`` of params-lm.yaml) sits beside it and the
method registers itself with :func:`register_lm_method`; the ``unlearn`` section of
params-lm.yaml is composed from :data:`LM_METHODS` (:mod:`pipeline_lib.config.text`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from pydantic import model_validator
from torch import nn

from pipeline_lib.denormals import flush_denormals
from pipeline_lib.methods.space import Choice, Dimension, LogUniform, check_space
from pipeline_lib.models.lm import (
    LMTrainConfig,
    Windows,
    corpus_loss,
    freeze_except,
    mean_loss,
    select_parameters,
    train_lm,
)
from pipeline_lib.registry import Registry
from pipeline_lib.schema import ConfigError, Field, Float, Int, section

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMUnlearnInputs:
    """Everything an LM method may read: windows of the forget, retain and held-out
    documents (held-out of the forgotten groups separately), and the oracle when one was
    trained (needed only by ``target: oracle``)."""

    forget: Windows
    retain: Windows
    heldout: Windows
    heldout_group: Windows | None
    model_factory: Callable[[int], nn.Module]
    train: LMTrainConfig
    oracle: nn.Module | None = None
    eval_batch_size: int = 32


Info = dict[str, float | int | str]


LMMethodFn = Callable[[nn.Module, LMUnlearnInputs, Any, int], tuple[nn.Module, Info]]


@dataclass(frozen=True)
class LMMethod:
    name: str
    fn: LMMethodFn
    params_type: type
    needs_oracle: Callable[[Any], bool]
    summary: str
    #: Hyper-parameter search space over fields of ``params_type``
    #: (:mod:`pipeline_lib.methods.space`; searched by benchmarks/lm_smollm2_claim.py).
    search_space: Mapping[str, Dimension] = field(default_factory=dict)


#: The LM unlearning methods by ``unlearn.method`` name, in registration order.
LM_METHODS: Registry[LMMethod] = Registry("LM method", key="unlearn.method")


def register_lm_method(
    name: str,
    params_type: type,
    summary: str,
    *,
    needs_oracle: Callable[[Any], bool] = lambda p: False,
    search_space: Mapping[str, Dimension] | None = None,
) -> Callable[[LMMethodFn], LMMethodFn]:
    """Decorator: register the decorated function as LM method ``name`` with hyper-parameters
    ``params_type`` (``unlearn.<name>`` of params-lm.yaml). ``needs_oracle(params)``: whether
    the pipeline must train the retrained oracle before running it. ``search_space``: fields
    of ``params_type`` a search may vary, checked here (as for the image methods)."""
    space = check_space(name, params_type, search_space or {})

    def deco(fn: LMMethodFn) -> LMMethodFn:
        fn = flush_denormals()(fn)  # as every training loop (pipeline_lib.denormals)
        params_type.__section_key__ = f"unlearn.{name}"  # type: ignore[attr-defined]
        LM_METHODS.add(name, LMMethod(name, fn, params_type, needs_oracle, summary, space))
        return fn

    return deco


def get_lm_method(name: str) -> LMMethod:
    """Look up an LM method; an unknown name lists the registered ones."""
    return LM_METHODS.lookup(name)


BlockIndex = Annotated[Int, Field(ge=0)]
Parameters = Literal["embedding", "all", "blocks"]


def _blocks_listed(p: Any) -> Any:
    """``parameters: blocks`` needs at least one block (whether each exists depends on the
    model: :class:`pipeline_lib.config.text.LMParams` checks it against ``lm.n_layer``)."""
    if p.parameters == "blocks" and not p.blocks:
        raise ConfigError("parameters is 'blocks' but no block is listed", key="blocks")
    return p


@section()
class GradientAscentParams:
    """First-epoch gradient ascent with calibration (Zagardo, arXiv 2406.09391;
    algorithms.md §3). See :func:`gradient_ascent`."""

    #: Passes over the forget documents (the paper: the first epoch is best).
    epochs: Int = Field(1, gt=0)
    lr: Float = Field(1e-2, gt=0)
    batch_size: Int = Field(8, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    #: Which weights move: token+position embeddings, everything, or the blocks listed.
    parameters: Parameters = "embedding"
    blocks: tuple[BlockIndex, ...] = ()
    #: stop: stop the ascent when the forget loss reaches the target (the last step
    #: interpolated to land on it); scale: ascend, then scale the whole update so the forget
    #: loss equals the target; none: plain ascent for ``epochs`` (the uncalibrated baseline).
    calibration: Literal["stop", "scale", "none"] = "stop"
    #: heldout: the original's mean token loss on held-out documents; heldout_group: on the
    #: held-out documents of the forgotten groups only; oracle: the retrained oracle's loss
    #: on the forget documents.
    target: Literal["heldout", "heldout_group", "oracle"] = "heldout"
    target_factor: Float = Field(1.0, gt=0)
    #: Optimiser steps between two checks of the forget loss (stop mode).
    check_every: Int = Field(1, gt=0)
    #: Largest multiple of the ascent update that scale mode may use.
    max_scale: Float = Field(4.0, ge=1)
    #: Bisection steps when landing on the target (stop and scale).
    bisect_steps: Int = Field(12, ge=0)
    max_grad_norm: Float | None = Field(None, gt=0)

    _blocks_listed = model_validator(mode="after")(_blocks_listed)


@section()
class LMNegGradPlusParams:
    """NegGrad+ for LMs: β·CE(retain) − (1−β)·CE(forget) per step."""

    epochs: Int = Field(1, gt=0)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(8, gt=0)
    beta: Float = Field(0.5, ge=0, le=1)
    parameters: Parameters = "all"
    blocks: tuple[BlockIndex, ...] = ()
    max_grad_norm: Float | None = Field(1.0, gt=0)

    _blocks_listed = model_validator(mode="after")(_blocks_listed)


@section()
class LMRetrainParams:
    """Retrain from scratch on the retain documents (``train`` section, this seed)."""

    seed: Int = 2


def _state_bytes(params: list[nn.Parameter], optimizer: str) -> int:
    """Bytes of gradients plus optimiser state of the moving parameters (weights excluded):
    SGD without momentum keeps none, Adam two moments."""
    n = sum(p.numel() * p.element_size() for p in params)
    return n * (1 + (2 if optimizer == "adam" else 0))


def _snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _set_interp(
    params: list[nn.Parameter], a: list[torch.Tensor], b: list[torch.Tensor], t: float
) -> None:
    with torch.no_grad():
        for p, x, y in zip(params, a, b, strict=True):
            p.copy_(x + t * (y - x))


def _bisect(
    loss_at: Callable[[float], float], lo: float, hi: float, target: float, steps: int
) -> tuple[float, float]:
    """Largest t in [lo, hi] found by bisection with loss_at(t) <= target, assuming
    loss_at(lo) < target <= loss_at(hi); returns (t, loss_at(t))."""
    best_t, best_l = lo, loss_at(lo)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lm = loss_at(mid)
        if lm < target:
            lo, best_t, best_l = mid, mid, lm
        else:
            hi = mid
    # the upper end is within tolerance too: take whichever is closer to the target
    lh = loss_at(hi)
    if abs(lh - target) < abs(best_l - target):
        return hi, lh
    loss_at(best_t)
    return best_t, best_l


def calibration_target(model: nn.Module, inputs: LMUnlearnInputs, p: GradientAscentParams) -> float:
    """The forget loss (mean token NLL) at which the ascent stops: ``target_factor`` times
    the original's loss on held-out documents (``heldout``), on the held-out documents of
    the forgotten groups (``heldout_group``), or the oracle's loss on the forget documents."""
    bs = inputs.eval_batch_size
    if p.target == "oracle":
        if inputs.oracle is None:
            raise ValueError("gradient_ascent.target 'oracle' needs the retrained oracle model")
        base = corpus_loss(inputs.oracle, inputs.forget, bs)
    elif p.target == "heldout_group":
        if inputs.heldout_group is None or len(inputs.heldout_group) == 0:
            raise ValueError(
                "gradient_ascent.target 'heldout_group': the forgotten groups have no held-out documents"
            )
        base = corpus_loss(model, inputs.heldout_group, bs)
    else:
        base = corpus_loss(model, inputs.heldout, bs)
    return p.target_factor * base


@register_lm_method(
    "gradient_ascent",
    GradientAscentParams,
    "first-epoch gradient ascent on the forget documents, calibrated to a target loss (Zagardo 2024)",
    needs_oracle=lambda p: p.calibration != "none" and p.target == "oracle",
    # the step size and which weights move (``blocks`` also needs ``blocks`` listed)
    search_space={
        "lr": LogUniform(1e-4, 3.0),
        "parameters": Choice(("embedding", "all", "blocks")),
    },
)
def gradient_ascent(
    model: nn.Module, inputs: LMUnlearnInputs, p: GradientAscentParams, seed: int
) -> tuple[nn.Module, Info]:
    """Gradient ascent on the forget documents' next-token loss (Zagardo 2024, §3 of
    algorithms.md), with the paper's three options:

    1. ``epochs``: passes over the forget set; 1 (the first-epoch gradients) by default.
    2. ``parameters``: ``embedding`` (default: token/position embeddings only, half the
       optimiser memory; in GPT-2 the token embedding is tied to the output layer), ``all``,
       or ``blocks`` (listed transformer blocks).
    3. Calibration against a target forget loss (:func:`calibration_target`; *open* in the
       paper, chosen here): ``stop`` checks the forget loss every ``check_every`` steps and
       stops once it reaches the target, bisecting the last step so it lands on it;
       ``scale`` runs the ascent, then scales the whole update Δ by α ∈ [0, max_scale]
       (bisection) so the forget loss equals the target; ``none`` is the uncalibrated
       baseline (still bounded by ``epochs``). A model already at or above the target is
       returned unchanged: the ascent never runs past the target when calibrated.

    Optimiser: plain SGD (the update is a sum of first-epoch gradients) or Adam.
    """
    gen = torch.Generator().manual_seed(seed)
    names = select_parameters(model, p.parameters, p.blocks)
    params = freeze_except(model, names)
    bs = inputs.eval_batch_size
    start = corpus_loss(model, inputs.forget, bs)
    target = calibration_target(model, inputs, p) if p.calibration != "none" else float("nan")
    info: Info = {
        "n_params_moved": sum(x.numel() for x in params),
        "trainable_state_bytes": _state_bytes(params, p.optimizer),
        "start_forget_loss": start,
        "target_loss": target,
        "steps": 0,
        "reached_target": 0,
        "scale": 1.0,
    }
    if p.calibration != "none" and start >= target:
        info["reached_target"] = 1
        info["final_forget_loss"] = start
        for x in model.parameters():
            x.requires_grad_(True)
        return model, info
    theta0 = _snapshot(params)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=p.lr)
        if p.optimizer == "sgd"
        else torch.optim.Adam(params, lr=p.lr)
    )
    steps, done = 0, False
    prev = theta0
    for _epoch in range(p.epochs):
        order = torch.randperm(len(inputs.forget), generator=gen)
        for i in range(0, len(order), p.batch_size):
            rows = order[i : i + p.batch_size]
            model.train()
            loss = mean_loss(model, inputs.forget.inputs[rows], inputs.forget.labels[rows])
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            if p.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            opt.step()
            steps += 1
            model.eval()
            if p.calibration == "stop" and steps % p.check_every == 0:
                now = corpus_loss(model, inputs.forget, bs)
                if now >= target:
                    cur = _snapshot(params)

                    def at(t: float, a=prev, b=cur) -> float:
                        _set_interp(params, a, b, t)
                        return corpus_loss(model, inputs.forget, bs)

                    t, _ = _bisect(at, 0.0, 1.0, target, p.bisect_steps)
                    _set_interp(params, prev, cur, t)
                    info["reached_target"] = 1
                    done = True
                    break
                prev = _snapshot(params)
        if done:
            break
    info["steps"] = steps
    info["epochs_run"] = _epoch + 1
    if p.calibration == "scale":
        end = _snapshot(params)

        def at_scale(a: float) -> float:
            _set_interp(params, theta0, end, a)
            return corpus_loss(model, inputs.forget, bs)

        if at_scale(p.max_scale) < target:
            info["scale"] = p.max_scale
        else:
            a, _ = _bisect(at_scale, 0.0, p.max_scale, target, p.bisect_steps)
            _set_interp(params, theta0, end, a)
            info["scale"] = a
            info["reached_target"] = 1
    info["final_forget_loss"] = corpus_loss(model, inputs.forget, bs)
    for x in model.parameters():
        x.requires_grad_(True)
    model.eval()
    return model, info


@register_lm_method(
    "neggrad_plus",
    LMNegGradPlusParams,
    "beta*CE(retain) - (1-beta)*CE(forget) (NegGrad+, Kurmanji et al. 2023)",
)
def neggrad_plus(
    model: nn.Module, inputs: LMUnlearnInputs, p: LMNegGradPlusParams, seed: int
) -> tuple[nn.Module, Info]:
    """NegGrad+ (Kurmanji et al. 2023) for LMs: each step pairs a forget batch with a retain
    batch (the retain windows cycled in a seeded order) and descends
    β·CE(retain) − (1−β)·CE(forget); Adam; ``epochs`` passes over the forget set."""
    gen = torch.Generator().manual_seed(seed)
    params = freeze_except(model, select_parameters(model, p.parameters, p.blocks))
    opt = torch.optim.Adam(params, lr=p.lr)
    r_order = torch.randperm(len(inputs.retain), generator=gen)
    r_pos, steps = 0, 0
    model.train()
    for _ in range(p.epochs):
        order = torch.randperm(len(inputs.forget), generator=gen)
        for i in range(0, len(order), p.batch_size):
            rows = order[i : i + p.batch_size]
            if r_pos + p.batch_size > len(r_order):
                r_order, r_pos = torch.randperm(len(inputs.retain), generator=gen), 0
            rr = r_order[r_pos : r_pos + p.batch_size]
            r_pos += p.batch_size
            loss = p.beta * mean_loss(model, inputs.retain.inputs[rr], inputs.retain.labels[rr]) - (
                1 - p.beta
            ) * mean_loss(model, inputs.forget.inputs[rows], inputs.forget.labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, p.max_grad_norm)
            opt.step()
            steps += 1
    model.eval()
    for x in model.parameters():
        x.requires_grad_(True)
    return model, {
        "steps": steps,
        "n_params_moved": sum(x.numel() for x in params),
        "trainable_state_bytes": _state_bytes(params, "adam"),
        "final_forget_loss": corpus_loss(model, inputs.forget, inputs.eval_batch_size),
    }


@register_lm_method(
    "retrain", LMRetrainParams, "train from scratch on the retain documents (the exact answer)"
)
def retrain(
    model: nn.Module, inputs: LMUnlearnInputs, p: LMRetrainParams, seed: int
) -> tuple[nn.Module, Info]:
    """Train a fresh model of the same architecture on the retain documents only."""
    fresh = inputs.model_factory(p.seed)
    stats = train_lm(fresh, inputs.retain, inputs.train, p.seed)
    return fresh, {"steps": int(stats["steps"]), "final_train_loss": stats["final_train_loss"]}
