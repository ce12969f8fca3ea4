"""Unlearning-method registry. Every method has one signature::

    fn(model, inputs: UnlearnInputs, params, seed) -> (model, info)

``model`` is a copy of the original (the method may change it in place), ``params`` the
method's typed section of ``params.yaml`` (``unlearn.<name>``), ``info`` a dict of scalars
worth tracking (how many weights were reset, ...). Shared pieces (the masked fine-tune loop
in :mod:`pipeline_lib.training.fit`, the Fisher diagonal, the top-fraction mask, the seeded batch
iterator) are composed, not re-written.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline_lib.attribution.matching import MatchTargets, match_outputs
from pipeline_lib.config import (
    ConfigError,
    DmmParams,
    FinetuneParams,
    FisherDiagonalParams,
    FisherForgettingParams,
    MnemonicCodeParams,
    NegGradPlusParams,
    OracleMatchingParams,
    RetrainParams,
    SalunParams,
    ScrubParams,
    SsdParams,
    SvdProjectionParams,
    TrainConfig,
)
from pipeline_lib.methods.fisher_baselines import fisher_forgetting, ssd
from pipeline_lib.methods.mnemonic import mnemonic_code
from pipeline_lib.methods.svd_projection import svd_projection
from pipeline_lib.training.fit import FitSettings, fit

log = logging.getLogger(__name__)


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


def select_by_ratio(
    fisher_forget: dict[str, torch.Tensor],
    fisher_retain: dict[str, torch.Tensor],
    eps: float,
    threshold: float | None,
    top_fraction: float,
) -> tuple[dict[str, torch.Tensor], float]:
    """Masks of weights whose r_i = I_F/(I_R+ε) exceeds γ (or the top fraction of r).

    Returns ({name: bool mask}, the γ actually used).
    """
    names = sorted(fisher_forget)
    if set(names) != set(fisher_retain):
        raise ValueError("forget and retain Fisher statistics cover different parameters")
    # 0/0 (a weight no sample moves, with eps=0) is no evidence of forget-sensitivity
    ratio = {
        k: torch.nan_to_num(fisher_forget[k] / (fisher_retain[k] + eps), nan=0.0) for k in names
    }
    if threshold is not None:
        return {k: ratio[k] > threshold for k in names}, float(threshold)
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(
            f"unlearn.fisher_diagonal.top_fraction must be in (0, 1], got {top_fraction}"
        )
    return top_fraction_mask(ratio, top_fraction)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one seeded random pass over ``n`` items."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _cycled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh seeded pass each time one runs out."""
    while True:
        yield from _batches(n, batch_size, gen)


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


def fisher_diagonal_forgetting(
    model: nn.Module, inputs: UnlearnInputs, params: FisherDiagonalParams, seed: int
) -> tuple[nn.Module, Info]:
    """DeepClean Fisher-diagonal forgetting (arXiv 2311.10448; algorithms.md §1).

    1. r_i = I_F(θ_i) / (I_R(θ_i) + ε) from the per-sample Fisher diagonals of F and R.
    2. Weights with r_i > γ (or the ``top_fraction`` largest r_i) are the forget-sensitive
       ones: reset them — to zero (default; the paper leaves it open), or to a fresh
       initialisation drawn with ``seed``. On digits zero forgets more at equal test
       accuracy (BENCHMARKS.md).
    3. Fine-tune only those weights on R for ``epochs`` epochs, all others frozen.
    """
    if inputs.fisher_forget is None or inputs.fisher_retain is None:
        raise ValueError("fisher_diagonal needs the forget and retain Fisher diagonals")
    masks, gamma = select_by_ratio(
        inputs.fisher_forget,
        inputs.fisher_retain,
        params.eps,
        params.threshold,
        params.top_fraction,
    )
    named = dict(model.named_parameters())
    fresh = dict(inputs.model_factory(seed).named_parameters()) if params.reset == "reinit" else {}
    with torch.no_grad():
        for name, m in masks.items():
            replacement = (
                fresh[name].to(named[name].device) if fresh else torch.zeros_like(named[name])
            )
            named[name].copy_(torch.where(m.to(named[name].device), replacement, named[name]))
    n_reset = int(sum(int(m.sum()) for m in masks.values()))
    n_total = int(sum(m.numel() for m in masks.values()))
    log.info("fisher_diagonal: reset %d of %d weights (γ=%.4g)", n_reset, n_total, gamma)
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(
        model,
        inputs.retain_X,
        inputs.retain_y,
        settings,
        seed,
        grad_mask=masks,
        device=inputs.device,
    )
    return model, {"n_reset": n_reset, "fraction_reset": n_reset / n_total, "gamma": gamma}


def finetune(
    model: nn.Module, inputs: UnlearnInputs, params: FinetuneParams, seed: int
) -> tuple[nn.Module, Info]:
    """Fine-tune baseline (FT in SalUn's tables): all weights, a few epochs on R only."""
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(model, inputs.retain_X, inputs.retain_y, settings, seed, device=inputs.device)
    return model, {}


def retrain(
    model: nn.Module, inputs: UnlearnInputs, params: RetrainParams, seed: int
) -> tuple[nn.Module, Info]:
    """Retrain baseline: a fresh model trained on R from scratch with the ``train`` section;
    the original weights are ignored. This is the exact (and most expensive) answer.
    Seeded with ``params.seed + seed``, so the N originals of an evaluation get N different
    retrained models."""
    t = inputs.train
    fresh = inputs.model_factory(params.seed + seed).to(inputs.device)
    settings = FitSettings(t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum)
    fit(fresh, inputs.retain_X, inputs.retain_y, settings, params.seed + seed, device=inputs.device)
    return fresh, {"seed": params.seed + seed}


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
    forget_batches = _cycled_batches(len(inputs.forget_y), params.batch_size, gen)
    ce = nn.functional.cross_entropy
    steps, last_r, last_f = 0, float("nan"), float("nan")
    for _ in range(params.epochs):
        for idx_r in _batches(len(inputs.retain_y), params.batch_size, gen):
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
            for idx in _batches(len(inputs.forget_y), params.batch_size, gen):
                xb = inputs.forget_X[idx].to(device)
                with torch.no_grad():
                    target = teacher(xb)
                loss = -distill_kl(student(xb), target, t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last_max = float(-loss.detach())
        for idx in _batches(len(inputs.retain_y), params.batch_size, gen):
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


def scrub(
    model: nn.Module, inputs: UnlearnInputs, params: ScrubParams, seed: int
) -> tuple[nn.Module, Info]:
    """SCRUB (Kurmanji et al., NeurIPS 2023, "Towards Unbounded Machine Unlearning"): the
    student starts from the original weights and the teacher is a frozen copy of them; see
    :func:`scrub_distill` for the exact losses."""
    teacher = copy.deepcopy(model).requires_grad_(False)
    info = scrub_distill(model, teacher, inputs, params, seed)
    return model, info


def forget_saliency(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency |∇_θ Σ_{x∈F} CE(f_θ(x), y)| ({name: tensor of the weight's
    shape}), from one pass over the forget set (X (N, *shape), y (N,)) in eval mode."""
    model.to(device).eval()
    named = dict(model.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in named.items()}
    for start in range(0, len(y), batch_size):
        xb, yb = X[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum")
        for k, g in zip(named, torch.autograd.grad(loss, list(named.values())), strict=True):
            grads[k] += g
    return {k: g.abs() for k, g in grads.items()}


def random_other_labels(y: torch.Tensor, n_classes: int, seed: int) -> torch.Tensor:
    """Labels drawn uniformly from the classes other than ``y`` (N,), seeded."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n_classes, y.shape, generator=gen)
    return (y + shift) % n_classes


def salun(
    model: nn.Module, inputs: UnlearnInputs, params: SalunParams, seed: int
) -> tuple[nn.Module, Info]:
    """SalUn (Fan et al., ICLR 2024, "SalUn: Empowering machine unlearning via gradient-based
    weight saliency"), random-label variant.

    1. Saliency s_i = |∂/∂θ_i Σ_{x∈F} CE(f_θ(x), y)| (:func:`forget_saliency`).
    2. Mask m = the top ``saliency_fraction`` of all weights by s (exactly
       round(fraction · n_params) of them, :func:`top_fraction_mask`).
    3. Fine-tune only the masked weights (the shared masked loop :func:`fit`, CE, Adam) on
       F relabelled uniformly at random among the *other* classes (seeded), together with R,
       for ``epochs`` epochs. Unmasked weights keep their exact values.
    """
    saliency = forget_saliency(
        model, inputs.forget_X, inputs.forget_y, params.batch_size, inputs.device
    )
    masks, cutoff = top_fraction_mask(saliency, params.saliency_fraction)
    with torch.no_grad():
        n_classes = int(model(inputs.forget_X[:1].to(inputs.device)).shape[-1])
    random_y = random_other_labels(inputs.forget_y, n_classes, seed)
    X = torch.cat([inputs.forget_X, inputs.retain_X])
    y = torch.cat([random_y, inputs.retain_y])
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(model, X, y, settings, seed, grad_mask=masks, device=inputs.device)
    n_masked = int(sum(int(m.sum()) for m in masks.values()))
    n_total = int(sum(m.numel() for m in masks.values()))
    log.info("salun: %d of %d weights masked (saliency >= %.4g)", n_masked, n_total, cutoff)
    return model, {
        "n_masked": n_masked,
        "fraction_masked": n_masked / n_total,
        "saliency_cutoff": cutoff,
    }


def _matching(
    model: nn.Module,
    inputs: UnlearnInputs,
    params: DmmParams | OracleMatchingParams,
    seed: int,
    source: str,
) -> tuple[nn.Module, Info]:
    m = inputs.match
    if m is None or m.source != source:
        raise ValueError(
            f"this method needs matching targets from {source}; the pipeline computes them "
            f"(got {'none' if m is None else m.source})"
        )
    info = match_outputs(
        model,
        m,
        params.epochs,
        params.lr,
        params.batch_size,
        params.lr_decay,
        params.weight_reg,
        seed,
        inputs.device,
    )
    return model, info


def dmm(
    model: nn.Module, inputs: UnlearnInputs, params: DmmParams, seed: int
) -> tuple[nn.Module, Info]:
    """Datamodel Matching (Georgiev et al., ICLR 2025, arXiv 2410.23232; algorithms.md §2):
    fine-tune to the DM-Direct prediction f̂ = f_θ − Σ_{i∈F} β_i of the retrained model's
    logits on F plus ``retain_multiple``·|F| retain points (MSE, Adam, lr × ``lr_decay`` per
    epoch). Targets come in ``inputs.match`` (:mod:`pipeline_lib.attribution.matching`)."""
    return _matching(model, inputs, params, seed, "datamodels")


def oracle_matching(
    model: nn.Module, inputs: UnlearnInputs, params: OracleMatchingParams, seed: int
) -> tuple[nn.Module, Info]:
    """Oracle Matching (same paper): the DMM fine-tuning with the mean logits of
    ``n_oracles`` models retrained on R as targets — DMM with perfect attribution."""
    return _matching(model, inputs, params, seed, "oracles")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "fisher_diagonal",
            fisher_diagonal_forgetting,
            FisherDiagonalParams,
            True,
            "reset weights with high forget/retain Fisher ratio, fine-tune them on R",
        ),
        Method("finetune", finetune, FinetuneParams, False, "fine-tune all weights on R"),
        Method("retrain", retrain, RetrainParams, False, "train from scratch on R (oracle)"),
        Method(
            "neggrad_plus",
            neggrad_plus,
            NegGradPlusParams,
            False,
            "descent on R and ascent on F: beta*CE(R) - (1-beta)*CE(F)",
        ),
        Method(
            "scrub",
            scrub,
            ScrubParams,
            False,
            "student max-KL to the original on F, min CE + KL on R",
        ),
        Method(
            "salun",
            salun,
            SalunParams,
            False,
            "fine-tune the most forget-salient weights on random-labelled F plus R",
        ),
        Method(
            "dmm",
            dmm,
            DmmParams,
            False,
            "match DM-Direct logits (f - sum_F beta, from the subset-model store) on F + 3|F| R",
            needs_targets="datamodels",
        ),
        Method(
            "oracle_matching",
            oracle_matching,
            OracleMatchingParams,
            False,
            "match the mean logits of models retrained on R (upper bound for dmm)",
            needs_targets="oracles",
        ),
        Method(
            "ssd",
            ssd,
            SsdParams,
            True,
            "dampen weights with I_F > alpha*I_D by min(lambda*I_D/I_F, 1) (SSD)",
        ),
        Method(
            "fisher_forgetting",
            fisher_forgetting,
            FisherForgettingParams,
            True,
            "Gaussian noise with variance alpha/(I_R+eps), clamped (Golatkar 2020)",
        ),
        Method(
            "svd_projection",
            svd_projection,
            SvdProjectionParams,
            False,
            "class forgetting: project layer weights off the class-discriminatory "
            "activation space, gradient-free (Kodge 2024)",
            class_only=True,
        ),
        Method(
            "mnemonic_code",
            mnemonic_code,
            MnemonicCodeParams,
            False,
            "one-shot class forgetting from the mnemonic class codes alone, no training data "
            "(Yamashita 2024)",
            needs_data=False,
            class_only=True,
        ),
    )
}


def get_method(name: str) -> Method:
    """Look up a method; an unknown name lists the registered ones."""
    if name not in METHODS:
        raise ConfigError(
            f"unknown unlearning method {name!r}; valid: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]
