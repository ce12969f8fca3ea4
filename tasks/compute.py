"""Compute tasks: train, Fisher statistics, unlearn, evaluate.

Training, statistics and unlearning are cached across runs (``INPUTS + TASK_SOURCE`` with
persisted JSON results): their inputs carry content digests of the data, the manifests, the
weights and of pipeline_lib's code, so a second run with unchanged inputs skips them and any
change re-runs exactly what depends on it. Results are small dicts of paths and numbers;
the tensors live in content-addressed safetensors files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline_lib.config import (
    AttributionConfig,
    ModelConfig,
    Params,
    TrainConfig,
    UnlearnConfig,
    parse_section,
)
from pipeline_lib.modalities import image as steps

CACHED = dict(cache_policy=INPUTS + TASK_SOURCE, persist_result=True, result_serializer="json")


def _splits(data: dict[str, str]) -> steps.Splits:
    return steps.load_splits(data["prepared_dir"], data["manifests_dir"])


@task(name="train-model", **CACHED)
def train_model(
    data: dict[str, str],
    role: str,
    model: dict,
    train: dict,
    seed: int,
    artifacts_dir: str,
    code: str,
) -> dict[str, Any]:
    """Train the original (``data`` without manifests: whole training split, reusable across
    requests) or the oracle (``data`` with manifests: retain set only).

    ``data`` holds the directories and their DVC md5s, which key the cache."""
    return steps.train_step(
        data["prepared_dir"],
        data.get("manifests_dir"),
        role,
        parse_section(ModelConfig, model),
        parse_section(TrainConfig, train),
        seed,
        artifacts_dir,
    )


@task(name="unlearn", **CACHED)
def unlearn(
    data: dict[str, str],
    weights: dict[str, Any],
    model: dict,
    train: dict,
    unlearn_cfg: dict,
    fisher: dict[str, Any] | None,
    artifacts_dir: str,
    code: str,
    store: dict[str, Any] | None = None,
    attribution: dict | None = None,
) -> dict[str, Any]:
    """Apply the configured unlearning method to the original model. ``store`` (root and
    masks digest, which keys the cache) is the attribution store of dmm / oracle_matching."""
    return steps.unlearn_step(
        _splits(data),
        weights["path"],
        parse_section(ModelConfig, model),
        parse_section(TrainConfig, train),
        parse_section(UnlearnConfig, unlearn_cfg),
        artifacts_dir,
        fisher,
        store["root"] if store else None,
        parse_section(AttributionConfig, attribution) if attribution else None,
    )


@task(name="evaluate")
def evaluate(
    data: dict[str, str],
    params: Params,
    weights: dict[str, str],
    unlearn_seconds: float,
    retrain_seconds: float,
    report_dir: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Metrics of original, oracle and unlearned models; report.json and report.png."""
    return steps.evaluate_step(
        _splits(data), params, weights, unlearn_seconds, retrain_seconds, Path(report_dir), extra
    )
