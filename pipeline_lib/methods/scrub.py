"""SCRUB (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning")."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from pipeline_lib.methods.base import Info, UnlearnInputs, batches, distill_kl, register_method
from pipeline_lib.methods.space import IntRange, LogUniform
from pipeline_lib.schema import Field, Float, Int, section

log = logging.getLogger(__name__)


@section()
class ScrubParams:
    """SCRUB (Kurmanji et al., NeurIPS 2023): teacher-student max/min distillation; Adam."""

    #: Total epochs; every epoch ends with one min-pass over the retain set.
    epochs: Int = Field(5, ge=0)
    #: The first ``max_steps`` epochs also start with one max-pass over the forget set.
    max_steps: Int = Field(2, ge=0)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(64, gt=0)
    #: Min-step loss: alpha_ce·CE + gamma_kl·KL on the retain set (algorithms.md: 0.99, 0.1).
    alpha_ce: Float = Field(0.99, ge=0)
    gamma_kl: Float = Field(0.1, ge=0)
    #: Distillation temperature T (the KL terms are scaled by T², as in the SCRUB code).
    temperature: Float = Field(4.0, gt=0)


def scrub_distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: UnlearnInputs,
    params: ScrubParams,
    seed: int,
) -> Info:
    """SCRUB's alternating optimisation of ``student`` (in place) against a frozen ``teacher``
    (Kurmanji et al., NeurIPS 2023, Alg. 1). With T = ``temperature`` and
    KL_T(x) = T² · KL(softmax(f_teacher(x)/T) ‖ softmax(f_student(x)/T)) (:func:`distill_kl`):

    - epochs 1..``max_steps``: first a *max-pass* over F, each batch minimising −KL_T
      (i.e. moving the student away from the teacher on the forget set);
    - every epoch: then a *min-pass* over R, each batch minimising
      ``alpha_ce`` · CE(f_student(x), y) + ``gamma_kl`` · KL_T(x).

    One Adam optimiser is shared by both passes, as in the authors' code. The teacher is
    never updated (no gradients flow into it). Returns info scalars.
    """
    device = inputs.device
    student.to(device).train()
    teacher.to(device).eval()
    opt = torch.optim.Adam(student.parameters(), lr=params.lr)
    gen = torch.Generator().manual_seed(seed)
    t = params.temperature
    last_max, last_min = float("nan"), float("nan")
    for epoch in range(params.epochs):
        if epoch < params.max_steps:
            for idx in batches(len(inputs.forget_y), params.batch_size, gen):
                xb = inputs.forget_X[idx].to(device)
                with torch.no_grad():
                    target = teacher(xb)
                loss = -distill_kl(student(xb), target, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last_max = float(-loss.detach())
        for idx in batches(len(inputs.retain_y), params.batch_size, gen):
            xb, yb = inputs.retain_X[idx].to(device), inputs.retain_y[idx].to(device)
            with torch.no_grad():
                target = teacher(xb)
            out = student(xb)
            loss = params.alpha_ce * nn.functional.cross_entropy(
                out, yb
            ) + params.gamma_kl * distill_kl(out, target, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last_min = float(loss.detach())
    student.eval()
    log.info("scrub: last forget KL %.4f, last retain loss %.4f", last_max, last_min)
    return {
        "max_epochs": min(params.max_steps, params.epochs),
        "last_forget_kl": last_max,
        "last_retain_loss": last_min,
    }


@register_method(
    "scrub",
    ScrubParams,
    "student max-KL to the original on F, min CE + KL on R",
    search_space={
        "epochs": IntRange(1, 10),
        "max_steps": IntRange(1, 5),
        "lr": LogUniform(1e-4, 1e-2),
        "gamma_kl": LogUniform(0.01, 1.0),
    },
)
def scrub(
    model: nn.Module, inputs: UnlearnInputs, params: ScrubParams, seed: int
) -> tuple[nn.Module, Info]:
    """SCRUB (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning"): the
    student starts from the original weights and the teacher is a frozen copy of them; see
    :func:`scrub_distill` for the exact losses."""
    teacher = copy.deepcopy(model).requires_grad_(False)
    info = scrub_distill(model, teacher, inputs, params, seed)
    return model, info
