"""The plain baselines: fine-tune on the retain set, and retrain from scratch (the oracle)."""

from __future__ import annotations

from torch import nn

from pipeline_lib.methods.base import Info, UnlearnInputs, register_method
from pipeline_lib.methods.space import IntRange, LogUniform
from pipeline_lib.schema import Field, Float, Int, section
from pipeline_lib.training.fit import FitSettings, fit


@section()
class FinetuneParams:
    """Fine-tune baseline: continue training all weights on the retain set."""

    epochs: Int = Field(5, ge=0)
    lr: Float = Field(1e-3, gt=0)
    batch_size: Int = Field(64, gt=0)


@section()
class RetrainParams:
    """Retrain baseline: train from scratch on the retain set with the ``train`` section."""

    seed: Int = 2


@register_method(
    "finetune",
    FinetuneParams,
    "fine-tune all weights on R",
    search_space={"epochs": IntRange(1, 20), "lr": LogUniform(1e-4, 1e-2)},
)
def finetune(
    model: nn.Module, inputs: UnlearnInputs, params: FinetuneParams, seed: int
) -> tuple[nn.Module, Info]:
    """Fine-tune baseline (FT in SalUn's tables): all weights, a few epochs on R only."""
    settings = FitSettings(params.epochs, params.batch_size, params.lr, "adam")
    fit(model, inputs.retain_X, inputs.retain_y, settings, seed, device=inputs.device)
    return model, {}


@register_method("retrain", RetrainParams, "train from scratch on R (oracle)")
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
