"""The unlearning pipeline as one Prefect flow, for any modality (image or text).

prepare data → extract the forget set (the modality's DVC stages, via ``dvc repro``) → train
the original model → train the retrain-from-scratch oracle → the inputs the method needs
(Fisher statistics, an attribution store, the oracle) → unlearn → evaluate → track everything
in one MLflow parent run named after the request id.

The modality comes from the params file (``pipeline: lm`` selects ``text``; none: ``image``);
its data-specific steps are plain functions (:mod:`pipeline_lib.modalities`) called by the
tasks in :mod:`tasks.compute`. Relative paths in the params file are relative to
``tracking.dvc_root`` (the project root by default), where the DVC stages run; the MLflow URI
is used as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from pipeline_lib.config import Params, environment_overrides, flatten, to_dict
from pipeline_lib.data.requests import load_request
from pipeline_lib.modalities import Modality, modality_for_params
from pipeline_lib.modalities.image import code_version
from tasks import compute, tracking, versioning
from tasks.compute import with_files
from tasks.statistics import fisher_statistics
from tasks.stores import ensure_store


def fisher_files(fisher: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the (cached) unlearning task needs of the Fisher statistics: the files and their
    content hashes, nothing that changes between runs that reuse them."""
    if fisher is None:
        return None
    keys = ("forget_path", "retain_path", "forget_digest", "retain_digest")
    return {k: fisher[k] for k in keys}


def fisher_metrics(fisher: dict[str, Any]) -> dict[str, float]:
    return {
        "time.fisher_seconds": fisher["seconds"],
        **{f"stats.fisher_{s}_reused": float(fisher[f"{s}_reused"]) for s in ("forget", "retain")},
    }


def attribution_store_for(
    params: Params, source: str, request_data: dict[str, str]
) -> dict[str, Any]:
    """The store an output-matching method takes its targets from, trained on Ray the first
    time and reused afterwards: ``attribution.n_models`` subset models (datamodels, for dmm;
    independent of the request) or ``oracle_matching.n_oracles`` oracles on the retain set."""
    import numpy as np

    from pipeline_lib.data.images import load_prepared
    from pipeline_lib.data.requests import load_manifests

    logger = get_run_logger()
    data = load_prepared(request_data["prepared_dir"])
    if source == "datamodels":
        root, stats = ensure_store(params, data, "subsets", params.attribution.n_models)
    else:
        man = load_manifests(request_data["manifests_dir"])
        train_ids = np.sort(data.split_ids("train"))
        om = params.unlearn.oracle_matching
        root, stats = ensure_store(
            params, data, "oracles", om.n_oracles, np.isin(train_ids, man.retain_ids), om.seed
        )
    logger.info(
        "attribution store %s (%d models trained now)", root, stats.get("models_trained", 0)
    )
    return {
        "root": root,
        "masks_digest": stats["masks_digest"],
        "attribution": to_dict(params.attribution),
    }


def method_extras(
    modality: Modality,
    params: Any,
    method: Any,
    original: dict[str, Any],
    oracle: dict[str, Any],
    request_data: dict[str, str],
    run_id: str,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the method reads beyond the data (each with the digests that key the unlearning
    cache): Fisher statistics (found or computed), an attribution store (trained on Ray the
    first time), the oracle. Returns (extras, the Fisher result or None)."""
    tr = params.tracking
    needs = modality.method_needs(method, params)
    extras: dict[str, Any] = {}
    fisher = None
    if "fisher" in needs:
        fisher = fisher_statistics(params, original)
        extras["fisher"] = fisher_files(fisher)
        tracking.set_tags(
            tr.mlflow_uri,
            run_id,
            {
                f"stats.fisher_{s}.{k}": str(fisher[f"{s}_{k}"])
                for s in ("forget", "retain")
                for k in ("digest", "path")
            },
        )
    if "store" in needs:
        extras["store"] = attribution_store_for(params, method.needs_targets, request_data)
    if "oracle" in needs:
        extras["oracle"] = oracle
    return extras, fisher


@flow(name="unlearning-pipeline")
def unlearning_pipeline(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one deletion request end to end; returns the MLflow run id and the report."""
    logger = get_run_logger()
    modality = modality_for_params(params_path)
    # The environment (MLFLOW_TRACKING_URI, RAY_ADDRESS) applies to deployments too.
    params = modality.load_params(
        params_path, {**environment_overrides(os.environ), **(overrides or {})}
    )
    method = modality.get_method(params.unlearn.method)
    tr = params.tracking
    root = Path(tr.dvc_root).resolve()
    request = load_request(str(params.resolve(params.request.file)))
    tracking.check_request_id(tr.mlflow_uri, tr.experiment, request.request_id, request.digest)
    params, staged = versioning.stage_data(modality, params, request)
    data = {k: staged[k] for k in ("prepared_dir", "prepared_md5")}
    request_data = dict(staged)
    code = code_version()
    artifacts = str(params.resolve(tr.artifacts_dir))
    cfg = to_dict(params)
    run_id = tracking.start_run(
        tr.mlflow_uri,
        tr.experiment,
        request.request_id,
        {
            "request_digest": request.digest,
            "method": method.name,
            "pipeline": modality.tag,
            "code_version": code,
            "request_reason": request.reason[:500],
        },
        str(root),
    )
    try:
        tracking.log_lineage(tr.mlflow_uri, run_id, modality.name, flatten(params), request_data)
        train_sections = modality.train_sections(cfg)
        original, oracle = (
            with_files(
                compute.train_model,
                ("path",),
                modality.name,
                inputs,
                role,
                train_sections,
                seed,
                artifacts,
                code,
            )
            for inputs, role, seed in (
                (data, "original", params.train.seed),
                (request_data, "oracle", params.train.oracle_seed),
            )
        )
        extras, fisher = method_extras(
            modality, params, method, original, oracle, request_data, run_id
        )
        unlearned = with_files(
            compute.unlearn,
            ("path",),
            modality.name,
            request_data,
            original,
            modality.unlearn_sections(cfg),
            extras,
            artifacts,
            code,
        )
        unlearn_seconds = unlearned["seconds"] + (fisher["seconds"] if fisher else 0.0)
        report_dir = params.resolve(params.evaluate.report_dir) / request.request_id / method.name
        suffix = "" if modality.name == "image" else f" ({modality.tag.upper()})"
        report = compute.evaluate(
            modality.name,
            request_data,
            params,
            {
                "original": original["path"],
                "oracle": oracle["path"],
                "unlearned": unlearned["path"],
            },
            unlearn_seconds,
            oracle["seconds"],
            str(report_dir),
            {
                "title": f"{request.request_id}: {method.name}{suffix}",
                "request_id": request.request_id,
                "method": method.name,
                "method_info": unlearned["info"],
                "mlflow_run_id": run_id,
            },
        )
        extra = {
            "time.original_train_seconds": original["seconds"],
            "time.oracle_train_seconds": oracle["seconds"],
            "time.method_seconds": unlearned["seconds"],
            **(fisher_metrics(fisher) if fisher else {}),
            **{
                f"method.{k}": float(v)
                for k, v in unlearned["info"].items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            },
        }
        tracking.log_results(
            tr.mlflow_uri,
            run_id,
            report,
            {"original": original, "oracle": oracle, "unlearned": unlearned},
            str(report_dir),
            extra,
        )
        prefix = "report" if modality.name == "image" else f"{modality.tag}-report"
        create_markdown_artifact(
            tracking.markdown_table(report, modality.summary_columns, modality.digits),
            key=tracking.artifact_key(prefix, request.request_id),
            description=f"unlearning report ({modality.name}), MLflow run {run_id}",
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    logger.info("MLflow run %s: %s", run_id, modality.summary_line(report))
    return {"run_id": run_id, "report": report, "report_dir": str(report_dir)}
