"""One-shot class unlearning with mnemonic codes (Yamashita et al., ACML 2024; algorithms.md §4).

Training option (``train.mnemonic_t_mix`` > 0): every class c has a fixed random *mnemonic
code* x_c ~ U[0, 1]^input_shape (seeded by ``train.mnemonic_seed``), and each training sample
is replaced by its class's code with probability t_mix, so the model learns the codes as
class prototypes (:class:`CodeMixer`, applied batch by batch inside the shared trainer).

Unlearning (:func:`mnemonic_code`) reads *no training data*: only the codes. One backward pass
per code gives the squared gradient of its cross-entropy;
F_f = mean over the forgotten classes' codes, F_r = mean over the other codes (both start at
1e-16), R = F_f / F_r (NaN → 0, +inf → the largest finite value), s = min(λ1, λ2 / max R),
θ± = θ ± s·R, and the sign whose model scores better on the codes —
(1 − forget-code accuracy) + remaining-code accuracy — is kept (ties: −). The clean-up of R,
max R and s are taken per parameter tensor, as the authors' public code does
(github.com/tomyamkum/OneShotMU-with-MNCode); the paper's formula leaves the scope open, and
a single global max R concentrates the whole step λ2 on the few weights whose F_r vanishes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline_lib.methods.base import Info, UnlearnInputs, register_method
from pipeline_lib.methods.space import LogUniform
from pipeline_lib.schema import Field, Float, section

log = logging.getLogger(__name__)


@section()
class MnemonicCodeParams:
    """Mnemonic-code one-shot class unlearning (Yamashita et al., ACML 2024): step
    s = min(lambda1, lambda2 / max R). Paper: MNIST MLP 1e-3 / 10; CIFAR-10 ResNet-18 1e-5 / 1e4.
    Needs a model trained with ``train.mnemonic_t_mix`` > 0."""

    lambda1: Float = Field(1e-3, gt=0)
    lambda2: Float = Field(10.0, gt=0)


def mnemonic_codes(shape: tuple[int, ...], n_classes: int, seed: int) -> torch.Tensor:
    """The class codes (n_classes, *shape) float32, x_c ~ U[0, 1], a pure function of
    (shape, n_classes, seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n_classes, *shape), generator=gen)


class CodeMixer:
    """Batch transform for :func:`pipeline_lib.training.fit.fit`: each sample is swapped for its
    class's code with probability ``t_mix`` (own seeded generator, so the data order of
    the trainer is unchanged)."""

    def __init__(self, codes: torch.Tensor, t_mix: float, seed: int) -> None:
        if not 0.0 <= t_mix <= 1.0:
            raise ValueError(f"t_mix must be in [0, 1], got {t_mix}")
        self.codes, self.t_mix = codes, t_mix
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        swap = torch.rand(len(yb), generator=self.gen) < self.t_mix
        if not bool(swap.any()):
            return xb, yb
        xb = xb.clone()
        xb[swap.to(xb.device)] = self.codes[yb[swap.to(yb.device)].cpu()].to(xb.device, xb.dtype)
        return xb, yb


def code_sensitivity(
    model: nn.Module, codes: torch.Tensor, classes: list[int]
) -> dict[str, torch.Tensor]:
    """Σ over ``classes`` of (∂ CE(f_θ(x_c), c) / ∂θ)²: one backward pass per code."""
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    device = next(model.parameters()).device
    for c in classes:
        x = codes[c : c + 1].to(device)
        loss = nn.functional.cross_entropy(model(x), torch.tensor([c], device=device))
        for k, g in zip(named, torch.autograd.grad(loss, list(named.values())), strict=True):
            acc[k] += g.square()
    return acc


@torch.no_grad()
def code_score(model: nn.Module, codes: torch.Tensor, forget: list[int]) -> float:
    """(1 − accuracy on the forgotten classes' codes) + accuracy on the other codes."""
    device = next(model.parameters()).device
    pred = model(codes.to(device)).argmax(1).cpu()
    hit = pred == torch.arange(len(codes))
    f = torch.zeros(len(codes), dtype=torch.bool)
    f[forget] = True
    return float(1.0 - hit[f].float().mean()) + float(hit[~f].float().mean())


@register_method(
    "mnemonic_code",
    MnemonicCodeParams,
    "one-shot class forgetting from the mnemonic class codes alone, no training data "
    "(Yamashita 2024)",
    needs_data=False,
    class_only=True,
    search_space={"lambda1": LogUniform(1e-5, 1e-1), "lambda2": LogUniform(0.1, 1e4)},
)
def mnemonic_code(
    model: nn.Module, inputs: UnlearnInputs, params: MnemonicCodeParams, seed: int
) -> tuple[nn.Module, Info]:
    """Mnemonic-code one-shot unlearning (module docstring). Uses ``inputs.mnemonic_codes``
    and ``inputs.forget_classes`` only; the pipeline hands it empty forget/retain tensors.
    Deterministic (``seed`` unused)."""
    codes = inputs.mnemonic_codes
    if codes is None:
        raise ValueError(
            "mnemonic_code needs a model trained with mnemonic codes (train.mnemonic_t_mix > 0)"
        )
    forget = sorted({int(c) for c in inputs.forget_classes})
    if not forget:
        raise ValueError("mnemonic_code forgets whole classes: the request must list classes")
    n_classes = len(codes)
    if forget[-1] >= n_classes or forget[0] < 0:
        raise ValueError(f"forget classes {forget} outside the {n_classes} coded classes")
    remain = [c for c in range(n_classes) if c not in forget]
    if not remain:
        raise ValueError("mnemonic_code: every class would be forgotten")
    model.to(inputs.device).eval()
    tiny = 1e-16
    f_f = {k: tiny + v / len(forget) for k, v in code_sensitivity(model, codes, forget).items()}
    f_r = {k: tiny + v / len(remain) for k, v in code_sensitivity(model, codes, remain).items()}
    # R, its clean-up and the step s are per parameter tensor, as in the authors' code
    step = {}
    for k in f_f:
        r = torch.nan_to_num(f_f[k] / f_r[k], nan=0.0)
        finite = r[torch.isfinite(r)]
        r = torch.nan_to_num(r, nan=0.0, posinf=float(finite.max()) if len(finite) else 0.0)
        top = float(r.max())
        s = min(params.lambda1, params.lambda2 / top) if top > 0 else 0.0
        step[k] = s * r
    if all(float(v.abs().max()) == 0 for v in step.values()):
        raise ValueError("mnemonic_code: no parameter is sensitive to the forget codes")
    base = {k: p.detach().clone() for k, p in model.named_parameters()}
    scores = {}
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for k, p in model.named_parameters():
                p.copy_(base[k] + sign * step[k])
            scores[sign] = code_score(model, codes, forget)
        best = 1.0 if scores[1.0] > scores[-1.0] else -1.0  # ties: −, as the authors' code
        for k, p in model.named_parameters():
            p.copy_(base[k] + best * step[k])
    biggest = max(float(v.abs().max()) for v in step.values())
    log.info("mnemonic_code: largest change %.3g, sign %+d, code scores %s", biggest, best, scores)
    return model, {"max_change": biggest, "sign": int(best), "code_score": scores[best]}
