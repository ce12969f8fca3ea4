"""Prefect tasks of the language-model pipeline: train (original, oracle), unlearn, evaluate,
and the MLflow lineage of a text corpus. Cached like the image tasks (``INPUTS +
TASK_SOURCE``; inputs carry the DVC md5s and the code version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from pipeline_lib.config import parse_section
from pipeline_lib.config.text import LMModelConfig, LMParams, LMTrainConfig, LMUnlearnConfig
from pipeline_lib.data.text import load_corpus
from pipeline_lib.modalities import text as lm_steps
from tasks.compute import CACHED
from tasks.tracking import RETRY, log_dataset_lineage


def _splits(data: dict[str, str]) -> lm_steps.TextSplits:
    return lm_steps.load_text_splits(data["prepared_dir"], data["manifests_dir"])


@task(name="train-lm", **CACHED)
def train_lm(
    data: dict[str, str],
    role: str,
    model: dict,
    train: dict,
    seed: int,
    artifacts_dir: str,
    code: str,
) -> dict[str, Any]:
    """The original LM (``data`` without manifests: every training document) or the oracle
    (with manifests: the retain documents)."""
    return lm_steps.lm_train_step(
        data["prepared_dir"],
        data.get("manifests_dir"),
        role,
        parse_section(LMModelConfig, model),
        parse_section(LMTrainConfig, train),
        seed,
        artifacts_dir,
    )


@task(name="unlearn-lm", **CACHED)
def unlearn_lm(
    data: dict[str, str],
    weights: dict[str, Any],
    oracle: dict[str, Any] | None,
    model: dict,
    train: dict,
    unlearn_cfg: dict,
    eval_batch_size: int,
    artifacts_dir: str,
    code: str,
) -> dict[str, Any]:
    """Apply the configured LM method to the original (``oracle`` only when the method's
    calibration targets the oracle's loss)."""
    return lm_steps.lm_unlearn_step(
        _splits(data),
        weights["path"],
        parse_section(LMModelConfig, model),
        parse_section(LMTrainConfig, train),
        parse_section(LMUnlearnConfig, unlearn_cfg),
        artifacts_dir,
        oracle["path"] if oracle else None,
        eval_batch_size,
    )


@task(name="evaluate-lm")
def evaluate_lm(
    data: dict[str, str],
    params: LMParams,
    weights: dict[str, str],
    unlearn_seconds: float,
    retrain_seconds: float,
    report_dir: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return lm_steps.lm_evaluate_step(
        _splits(data), params, weights, unlearn_seconds, retrain_seconds, Path(report_dir), extra
    )


@task(name="mlflow-log-text-lineage", **RETRY)
def log_text_lineage(
    uri: str, run_id: str, flat_params: dict[str, Any], data: dict[str, str]
) -> None:
    """Params; the prepared corpus (ids, groups, splits) and the forget/retain manifests as
    dataset inputs with their DVC md5s; the corpus content hash as a tag."""
    corpus = load_corpus(data["prepared_dir"])
    table = pd.DataFrame({"doc_id": corpus.ids, "group": corpus.groups, "split": corpus.split})
    log_dataset_lineage(
        uri,
        run_id,
        flat_params,
        data,
        table,
        corpus.meta["dataset"],
        corpus.content_hash,
        id_column="doc_id",
    )
