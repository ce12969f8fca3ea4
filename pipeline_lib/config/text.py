"""Typed, frozen configuration of the language-model pipeline (``params-lm.yaml``).

Same rules and the same parser as :mod:`pipeline_lib.config` (strict keys and types,
declared constraints, errors naming the dotted key); a separate params file because the LM
pipeline has its own data (``text``), model (``lm``), trainer and method registry. Sections
live with what they configure: ``text`` in :mod:`pipeline_lib.data.text`, ``lm`` and
``train`` in :mod:`pipeline_lib.models.lm`, every ``unlearn.<method>`` beside its method in
:mod:`pipeline_lib.methods.text`; ``unlearn`` is composed from that registry. ``pipeline:
lm`` at the top of the file is how ``unlearn run --params FILE`` tells the two pipelines
apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from pipeline_lib.config import (
    TrackingConfig,
    apply_overrides,
    environment_overrides,
    methods_section,
    read_params_file,
)
from pipeline_lib.data.text import TextConfig
from pipeline_lib.methods.text import (
    LM_METHODS,
    GradientAscentParams,
    LMNegGradPlusParams,
    LMRetrainParams,
)
from pipeline_lib.models.lm import LMModelConfig, LMTrainConfig
from pipeline_lib.schema import ConfigError, Field, Float, Int, Str, parse_section, section
from pipeline_lib.service.config import ServiceConfig

__all__ = [
    "ConfigError",
    "GradientAscentParams",
    "LMEvaluateConfig",
    "LMModelConfig",
    "LMNegGradPlusParams",
    "LMParams",
    "LMRequestConfig",
    "LMRetrainParams",
    "LMTrainConfig",
    "LMUnlearnConfig",
    "TextConfig",
    "build_lm_params",
    "environment_overrides",
    "is_lm_params_file",
    "load_lm_params",
    "read_params_file",
]


@section("request")
class LMRequestConfig:
    """The deletion request; the manifests go to data/text/forget (the DVC stage's out)."""

    file: Str = "requests/forget-play.yaml"


LMUnlearnConfig = methods_section(
    "LMUnlearnConfig",
    LM_METHODS,
    default="gradient_ascent",
    module=__name__,
    doc="Which LM unlearning method runs, with one typed sub-section per registered method.",
)


@section("evaluate")
class LMEvaluateConfig:
    seed: Int = 0
    mia_folds: Int = Field(5, ge=2)
    #: Verbatim memorisation: greedy continuation of ``continuation_tokens`` after a
    #: ``prefix_tokens`` prefix, at ``prefixes_per_doc`` evenly spaced places per document.
    prefix_tokens: Int = Field(32, gt=0)
    continuation_tokens: Int = Field(16, gt=0)
    prefixes_per_doc: Int = Field(4, gt=0)
    batch_size: Int = Field(32, gt=0)
    report_dir: Str = "reports"
    #: Influence of each forget document on held-out prompts (pipeline_lib.evaluation.influence):
    #: gradient dot products, or g_h^T (H + damping I)^-1 g_f with HVPs (torch.func); none.
    influence: Literal["none", "grad_dot", "hvp"] = "grad_dot"
    #: Held-out prompts: the first window of this many held-out documents.
    influence_prompts: Int = Field(8, gt=0)
    influence_parameters: Literal["embedding", "all"] = "embedding"
    influence_damping: Float = Field(0.1, ge=0)
    influence_cg_steps: Int = Field(10, gt=0)
    #: Training windows (seeded sample) whose loss Hessian the HVPs use.
    influence_hessian_windows: Int = Field(32, gt=0)


@section()
class LMParams:
    pipeline: Literal["lm"] = "lm"
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    lm: LMModelConfig = dataclasses.field(default_factory=LMModelConfig)
    train: LMTrainConfig = dataclasses.field(default_factory=LMTrainConfig)
    request: LMRequestConfig = dataclasses.field(default_factory=LMRequestConfig)
    unlearn: LMUnlearnConfig = dataclasses.field(default_factory=LMUnlearnConfig)  # type: ignore[valid-type]
    evaluate: LMEvaluateConfig = dataclasses.field(default_factory=LMEvaluateConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    service: ServiceConfig = dataclasses.field(
        default_factory=lambda: ServiceConfig(model_name="unlearnflow-shakespeare")
    )

    def resolve(self, path: str) -> Path:
        """``path`` if absolute, else relative to ``tracking.dvc_root``."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.tracking.dvc_root).resolve() / p

    @model_validator(mode="after")
    def _fits_the_model(self) -> LMParams:
        """Checks across sections: the ones a single section cannot make."""
        lm, ev = self.lm, self.evaluate
        if lm.n_embd % lm.n_head:
            raise ConfigError(
                f"must be a multiple of lm.n_head ({lm.n_head}), got {lm.n_embd}", key="lm.n_embd"
            )
        if ev.prefix_tokens + ev.continuation_tokens > lm.n_positions:
            raise ConfigError(
                f"must fit the context lm.n_positions={lm.n_positions}, got "
                f"{ev.prefix_tokens + ev.continuation_tokens}",
                key="evaluate.prefix_tokens + evaluate.continuation_tokens",
            )
        if lm.kind == "gpt2":  # a pretrained model's depth is its own
            for name in LM_METHODS:
                p = self.unlearn.method_params(name)
                if getattr(p, "parameters", None) != "blocks":
                    continue
                bad = [b for b in p.blocks if b >= lm.n_layer]
                if bad:
                    raise ConfigError(
                        f"block {bad[0]} does not exist (lm.n_layer={lm.n_layer})",
                        key=f"unlearn.{name}.blocks",
                    )
        return self


def build_lm_params(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> LMParams:
    """Parse a raw mapping plus dotted-key ``overrides`` into :class:`LMParams`."""
    return parse_section(LMParams, apply_overrides(raw, overrides), prefix="")


def load_lm_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> LMParams:
    """Read ``params-lm.yaml`` and apply dotted-key overrides."""
    return build_lm_params(read_params_file(path), overrides)


def is_lm_params_file(path: str | Path) -> bool:
    """True when the file says ``pipeline: lm`` (unlearn run dispatches on it)."""
    try:
        return read_params_file(path).get("pipeline") == "lm"
    except ConfigError:
        return False
