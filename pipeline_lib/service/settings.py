"""What the read-only service commands need from a params file (``unlearn lineage request |
sample | model``): the tracking URI and the ``service`` section, read without composing the
whole :class:`pipeline_lib.config.Params`. Composing it imports every method and model (and
so torch), seconds of start-up that a lineage query has no use for.

The values are those :func:`pipeline_lib.config.load_params` gives: the same YAML checks,
``MLFLOW_TRACKING_URI`` over ``tracking.mlflow_uri``, the ``service`` section parsed and
checked by its own class (``tests/test_lineage.py`` compares the two loaders).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline_lib.schema import ConfigError, parse_section
from pipeline_lib.service.config import ServiceConfig

#: ``tracking.mlflow_uri`` when the file has none (the default of the ``tracking`` section).
DEFAULT_MLFLOW_URI = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class ServiceSettings:
    mlflow_uri: str
    service: ServiceConfig


def read_service_settings(path: str | Path, environ: Mapping[str, str]) -> ServiceSettings:
    """The tracking URI and ``service`` section of the params file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    tracking = raw.get("tracking") or {}
    if not isinstance(tracking, dict):
        raise ConfigError(f"tracking: expected a mapping, got {type(tracking).__name__}")
    uri = environ.get("MLFLOW_TRACKING_URI") or tracking.get("mlflow_uri", DEFAULT_MLFLOW_URI)
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"tracking.mlflow_uri: expected a non-empty string, got {uri!r}")
    service = raw.get("service") or {}
    if not isinstance(service, dict):
        raise ConfigError(f"service: expected a mapping, got {type(service).__name__}")
    return ServiceSettings(uri, parse_section(ServiceConfig, service, prefix="service"))
