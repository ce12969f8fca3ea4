"""What every unlearning method shares: its inputs, its registry entry, and the pieces that
several methods compose (the top-fraction mask, seeded batch iterators, the distillation KL).

Every method has one signature::

    fn(model, inputs: UnlearnInputs, params, seed) -> (model, info)

``model`` is a copy of the original (the method may change it in place), ``params`` the
method's typed section of ``params.yaml`` (``unlearn.<name>``), ``info`` a dict of scalars
worth tracking (how many weights were reset, ...).

A method lives in its own module with its params section beside it, and registers itself::

    @section()
    class MyParams:
        epochs: Int = Field(5, ge=0)

    @register_method("my_method", MyParams, "one line for `unlearn methods`")
    def my_method(model, inputs, params: MyParams, seed): ...

The ``unlearn`` section of params.yaml gets one sub-section per registered method
(:mod:`pipeline_lib.config`), so adding a method touches its module, its test and the
defaults in params.yaml; the package ``__init__`` imports the module so that it registers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline_lib.attribution.matching import MatchTargets
from pipeline_lib.denormals import flush_denormals
from pipeline_lib.methods.space import Dimension, check_space
from pipeline_lib.registry import Registry
from pipeline_lib.training.fit import TrainConfig


@dataclass(frozen=True)
class UnlearnInputs:
    """Everything a method may read. Tensors: X (N, *shape) float32, y (N,) int64."""

    forget_X: torch.Tensor
    forget_y: torch.Tensor
    retain_X: torch.Tensor
    retain_y: torch.Tensor
    #: Builds a freshly initialised model of the same architecture from a seed.
    model_factory: Callable[[int], nn.Module]
    train: TrainConfig
    #: Fisher diagonals I_F and I_R ({param name: tensor}) when the method needs them.
    fisher_forget: dict[str, torch.Tensor] | None = None
    fisher_retain: dict[str, torch.Tensor] | None = None
    device: torch.device = torch.device("cpu")
    #: Matching points and target logits for the output-matching methods (dmm, oracle_matching).
    match: MatchTargets | None = None
    #: Classes of a class request (``forget: classes``); empty for other requests.
    forget_classes: tuple[int, ...] = ()
    #: Mnemonic class codes (n_classes, *shape) when the model was trained with them.
    mnemonic_codes: torch.Tensor | None = None


Info = dict[str, float | int | str]
MethodFn = Callable[[nn.Module, UnlearnInputs, Any, int], tuple[nn.Module, Info]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    params_type: type
    needs_fisher: bool
    summary: str
    #: Target logits the method matches: "" (none), "datamodels" or "oracles".
    needs_targets: str = ""
    #: False: the method reads no training data; the pipeline hands it empty forget/retain
    #: tensors (``forget_classes`` and ``mnemonic_codes`` are what it gets).
    needs_data: bool = True
    #: True: forgets whole classes (a ``forget: classes`` request); meaningless for a random
    #: forget set, so ``unlearn evaluate`` on such a request leaves it out.
    class_only: bool = False
    #: Hyper-parameters ``unlearn tune`` searches ({field: dimension}, :mod:`.space`); empty:
    #: nothing to tune (``retrain`` is exact).
    search_space: Mapping[str, Dimension] = field(default_factory=dict)


#: The unlearning methods by ``unlearn.method`` name, in registration order (the order of
#: the ``unlearn`` sub-sections and of ``unlearn evaluate``'s rows).
METHODS: Registry[Method] = Registry("unlearning method")


def register_method(
    name: str,
    params_type: type,
    summary: str,
    *,
    needs_fisher: bool = False,
    needs_targets: str = "",
    needs_data: bool = True,
    class_only: bool = False,
    search_space: Mapping[str, Dimension] | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register the decorated function as method ``name`` whose hyper-parameters
    are the section ``params_type`` (``unlearn.<name>`` of params.yaml); ``search_space``
    declares what ``unlearn tune`` may vary (checked against the section here). The method
    runs under :func:`pipeline_lib.denormals.flush_denormals`, as every training loop does."""
    space = check_space(name, params_type, search_space or {})

    def deco(fn: MethodFn) -> MethodFn:
        fn = flush_denormals()(fn)
        params_type.__section_key__ = f"unlearn.{name}"  # type: ignore[attr-defined]
        METHODS.add(
            name,
            Method(
                name,
                fn,
                params_type,
                needs_fisher,
                summary,
                needs_targets=needs_targets,
                needs_data=needs_data,
                class_only=class_only,
                search_space=space,
            ),
        )
        return fn

    return deco


def get_method(name: str) -> Method:
    """Look up a method; an unknown name lists the registered ones."""
    return METHODS.lookup(name)


# --------------------------------------------------------------------------- shared pieces


def top_fraction_mask(
    scores: dict[str, torch.Tensor], fraction: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Bool masks ({name: mask of the tensor's shape}) selecting exactly
    ``max(1, round(fraction · n))`` entries with the largest scores across all tensors
    (n = total entries; ties broken by ``torch.topk``). Returns (masks, smallest chosen score).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    names = sorted(scores)
    flat = torch.cat([scores[k].flatten() for k in names])
    k = max(1, int(round(fraction * flat.numel())))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    top = torch.topk(flat, k)
    chosen[top.indices] = True  # exact count even when scores tie
    masks, offset = {}, 0
    for name in names:
        n = scores[name].numel()
        masks[name] = chosen[offset : offset + n].view_as(scores[name])
        offset += n
    return masks, float(top.values.min())


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one seeded random pass over ``n`` items."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def cycled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh seeded pass each time one runs out."""
    while True:
        yield from batches(n, batch_size, gen)


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float
) -> torch.Tensor:
    """KL(p_teacher^T ‖ p_student^T) · T², averaged over the batch (B, C) -> scalar.

    The same quantity as SCRUB's ``DistillKL`` (Hinton et al.'s scaling by T² keeps the
    gradient magnitude independent of the temperature).
    """
    log_p_s = nn.functional.log_softmax(student_logits / t, dim=1)
    log_p_t = nn.functional.log_softmax(teacher_logits / t, dim=1)
    kl = nn.functional.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * t * t
