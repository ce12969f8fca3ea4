"""Typed, frozen configuration parsed from ``params.yaml``: the sections composed into
:class:`Params`, dotted overrides, and the reading of params files.

Each top-level section of ``params.yaml`` maps onto one frozen, validated section
(:mod:`pipeline_lib.schema`). Sections live with what they configure: ``data`` beside the
dataset registry (:mod:`pipeline_lib.data.images`), ``model`` beside the model registry
(:mod:`pipeline_lib.models.image`), ``train`` beside the trainer
(:mod:`pipeline_lib.training.fit`), every ``unlearn.<method>`` beside its method
(:mod:`pipeline_lib.methods`), the rest in :mod:`pipeline_lib.config.sections`. The
``unlearn`` section is composed from the method registry: one sub-section per registered
method. Parsing is strict: an unknown key or a bad value raises :class:`ConfigError` naming
the full dotted key (``train.lr``), so a typo fails before any work starts.

Nothing below this package imports it: it is the one place that knows every section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator

from pipeline_lib.config.presets import TuneConfig, check_name, preset_overrides
from pipeline_lib.config.sections import (
    AttributionConfig,
    EvaluateConfig,
    FisherConfig,
    RayConfig,
    RequestConfig,
    StatsConfig,
    TrackingConfig,
)
from pipeline_lib.data.images import DataConfig
from pipeline_lib.methods import METHODS
from pipeline_lib.models.image import ModelConfig
from pipeline_lib.registry import Registry
from pipeline_lib.schema import (
    ConfigError,
    Int,
    Str,
    flatten,
    make_section,
    parse_section,
    replace,
    section,
    to_dict,
)
from pipeline_lib.service.config import ServiceConfig
from pipeline_lib.training.fit import TrainConfig

__all__ = [
    "AttributionConfig",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "FisherConfig",
    "ModelConfig",
    "Params",
    "RayConfig",
    "RequestConfig",
    "StatsConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "UnlearnConfig",
    "apply_overrides",
    "build_params",
    "environment_overrides",
    "flatten",
    "load_params",
    "methods_section",
    "parse_section",
    "read_params_file",
    "replace",
    "to_dict",
]


# --------------------------------------------------------------------------- composition


def _method_params(self: Any, name: str | None = None) -> Any:
    """The typed hyper-parameters of ``name`` (default: the selected method)."""
    return getattr(self, name or self.method)


def methods_section(
    name: str,
    registry: Registry[Any],
    *,
    default: str,
    module: str,
    doc: str,
    presets: bool = False,
) -> type:
    """The ``unlearn`` section of a params file, composed from a method registry: ``method``
    (a registered name), ``seed``, ``preset`` (with ``presets``: a named preset of tuned
    settings, :mod:`pipeline_lib.config.presets`), and one sub-section per registered method
    (its entry's ``params_type``, defaults as declared), in registration order;
    ``method_params(name)`` returns a method's sub-section."""
    fields: list[tuple[str, Any, Any]] = [
        (
            "method",
            Annotated[Str, AfterValidator(registry.check)],
            dataclasses.field(default=default),
        ),
        ("seed", Int, dataclasses.field(default=0)),
    ]
    if presets:
        fields.append(
            (
                "preset",
                Annotated[Str, AfterValidator(check_name)] | None,
                dataclasses.field(default=None),
            )
        )
    for method_name, entry in registry.items():
        tp = entry.params_type
        fields.append((method_name, tp, dataclasses.field(default_factory=tp)))
    return make_section(
        name,
        fields,
        key="unlearn",
        module=module,
        doc=doc,
        namespace={"method_params": _method_params},
    )


UnlearnConfig = methods_section(
    "UnlearnConfig",
    METHODS,
    default="fisher_diagonal",
    module=__name__,
    doc="Which unlearning method runs, with one typed sub-section per registered method.",
    presets=True,
)


@section()
class Params:
    """The whole ``params.yaml``."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    request: RequestConfig = dataclasses.field(default_factory=RequestConfig)
    fisher: FisherConfig = dataclasses.field(default_factory=FisherConfig)
    unlearn: UnlearnConfig = dataclasses.field(default_factory=UnlearnConfig)  # type: ignore[valid-type]
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    attribution: AttributionConfig = dataclasses.field(default_factory=AttributionConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    stats: StatsConfig = dataclasses.field(default_factory=StatsConfig)
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)

    def resolve(self, path: str) -> Path:
        """``path`` if absolute, else relative to ``tracking.dvc_root`` (where the DVC stages
        run), as an absolute path: the one rule for every path in a params file."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.tracking.dvc_root).resolve() / p


# --------------------------------------------------------------------------- files


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Load the raw mapping of a params file with a clear error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(
    raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A copy of the raw mapping with dotted-key ``overrides`` (``{"train.lr": 0.1}``) set;
    ``raw`` is not mutated. Missing sections are created."""
    tree = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return tree


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Overrides taken from the environment, so the same code runs against shared services:
    ``MLFLOW_TRACKING_URI`` sets ``tracking.mlflow_uri`` and ``RAY_ADDRESS`` sets
    ``ray.address``. Explicit overrides win over these."""
    out: dict[str, Any] = {}
    if environ.get("MLFLOW_TRACKING_URI"):
        out["tracking.mlflow_uri"] = environ["MLFLOW_TRACKING_URI"]
    if environ.get("RAY_ADDRESS"):
        out["ray.address"] = environ["RAY_ADDRESS"]
    return out


def build_params(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Params:
    """Parse a raw mapping plus dotted-key ``overrides`` into :class:`Params`. A selected
    preset (``unlearn.preset``) sets its methods' sections over the file's values; the
    explicit ``overrides`` are applied last, so they win over the preset."""
    tree = apply_overrides(raw, overrides)
    from_preset = preset_overrides(tree)
    if from_preset:
        tree = apply_overrides(apply_overrides(raw, from_preset), overrides)
    return parse_section(Params, tree, prefix="")


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read ``params.yaml`` and apply overrides such as ``{"unlearn.method": "finetune"}``."""
    return build_params(read_params_file(path), overrides)
