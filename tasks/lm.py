"""Prefect tasks of the language-model pipeline: train (original, oracle), unlearn, evaluate,
and the MLflow lineage of a text corpus. Cached like the image tasks (``INPUTS +
TASK_SOURCE``; inputs carry the DVC md5s and the code version)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Param, RunTag
from prefect import task

from pipeline_lib import lm_steps
from pipeline_lib.config import parse_section
from pipeline_lib.lm_config import LMModelConfig, LMParams, LMTrainConfig, LMUnlearnConfig
from pipeline_lib.requests import load_manifests
from pipeline_lib.text import load_corpus
from tasks.compute import CACHED
from tasks.tracking import RETRY, _dataset_input, client_for


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
    client = client_for(uri)
    client.log_batch(
        run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(flat_params.items())]
    )
    corpus = load_corpus(data["prepared_dir"])
    man = load_manifests(data["manifests_dir"])
    table = pd.DataFrame({"doc_id": corpus.ids, "group": corpus.groups, "split": corpus.split})
    inputs = [
        _dataset_input(
            table,
            str(Path(data["prepared_dir"]).resolve()),
            f"{corpus.meta['dataset']}-prepared",
            "training",
            {"dvc_md5": data["prepared_md5"], "content_hash": corpus.content_hash},
        )
    ]
    for split, ids in (("forget", man.forget_ids), ("retain", man.retain_ids)):
        inputs.append(
            _dataset_input(
                pd.DataFrame({"doc_id": ids}),
                str(Path(data["manifests_dir"]).resolve() / f"{split}_ids.parquet"),
                f"{man.summary['request']['request_id']}-{split}",
                split,
                {"dvc_md5": data["manifests_md5"], "request_digest": man.summary["request_digest"]},
            )
        )
    client.log_inputs(run_id, datasets=inputs)
    client.log_batch(
        run_id,
        tags=[
            RunTag("data_content_hash", corpus.content_hash),
            RunTag("dvc.prepared_md5", data["prepared_md5"]),
            RunTag("dvc.manifests_md5", data["manifests_md5"]),
        ],
    )
