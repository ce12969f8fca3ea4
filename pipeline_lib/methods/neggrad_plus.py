"""NegGrad+ (Kurmanji et al., NeurIPS 2023): descent on the retain set, ascent on the forget set."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline_lib.methods.base import (
    Info,
    UnlearnInputs,
    batches,
    cycled_batches,
    register_method,
)
from pipeline_lib.methods.space import IntRange, LogUniform, Uniform
from pipeline_lib.schema import Field, Float, Int, section

log = logging.getLogger(__name__)


@section()
class NegGradPlusParams:
    """NegGrad+ baseline (Kurmanji et al. 2023, as defined in SCRUB's paper).

    Loss per step: ``beta·CE(retain batch) − (1 − beta)·CE(forget batch)``; Adam.
    """

    epochs: Int = Field(5, ge=0)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(64, gt=0)
    #: Weight of the retain (descent) term; the forget (ascent) term gets 1 − beta. The
    #: paper tunes it per setting; 0.9 keeps retain accuracy on small MLPs.
    beta: Float = Field(0.9, ge=0, le=1)


@register_method(
    "neggrad_plus",
    NegGradPlusParams,
    "descent on R and ascent on F: beta*CE(R) - (1-beta)*CE(F)",
    search_space={
        "epochs": IntRange(1, 10),
        "lr": LogUniform(1e-4, 5e-3),
        "beta": Uniform(0.5, 0.999),
    },
)
def neggrad_plus(
    model: nn.Module, inputs: UnlearnInputs, params: NegGradPlusParams, seed: int
) -> tuple[nn.Module, Info]:
    """NegGrad+ (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning",
    the NegGrad+ baseline of SCRUB's paper): gradient descent on R and ascent on F at once.

    Each step takes the next retain batch (x_r, y_r) and the next forget batch (x_f, y_f)
    (forget batches cycle, reshuffled each time F is exhausted) and minimises::

        β · CE(f_θ(x_r), y_r) − (1 − β) · CE(f_θ(x_f), y_f)

    with Adam for ``epochs`` passes over R. β = ``params.beta`` (default 0.9, chosen here;
    the paper tunes it per setting).
    """
    device = inputs.device
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    gen = torch.Generator().manual_seed(seed)
    forget_batches = cycled_batches(len(inputs.forget_y), params.batch_size, gen)
    ce = nn.functional.cross_entropy
    steps, last_r, last_f = 0, float("nan"), float("nan")
    for _ in range(params.epochs):
        for idx_r in batches(len(inputs.retain_y), params.batch_size, gen):
            idx_f = next(forget_batches)
            loss_r = ce(model(inputs.retain_X[idx_r].to(device)), inputs.retain_y[idx_r].to(device))
            loss_f = ce(model(inputs.forget_X[idx_f].to(device)), inputs.forget_y[idx_f].to(device))
            loss = params.beta * loss_r - (1.0 - params.beta) * loss_f
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps, last_r, last_f = steps + 1, float(loss_r.detach()), float(loss_f.detach())
    log.info("neggrad_plus: %d steps, last retain CE %.4f forget CE %.4f", steps, last_r, last_f)
    return model.eval(), {"steps": steps, "last_retain_ce": last_r, "last_forget_ce": last_f}
