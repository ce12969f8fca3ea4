"""The unlearning pipeline as a Prefect flow.

prepare data → extract the forget set (both DVC stages, via ``dvc repro``) → train the
original model → train the retrain-from-scratch oracle → Fisher statistics (when the method
needs them) → unlearn → evaluate → track everything in one MLflow parent run named after the
request id.

Relative paths in the params file are relative to ``tracking.dvc_root`` (the project root by
default), where the DVC stages run; the MLflow URI is used as given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows.stats import fisher_statistics
from pipeline_lib.config import (
    Params,
    environment_overrides,
    flatten,
    load_params,
    replace,
    to_dict,
)
from pipeline_lib.data.images import load_prepared
from pipeline_lib.data.requests import DeletionRequest, extract_forget_set, load_request
from pipeline_lib.evaluation.metrics import SUMMARY_COLUMNS
from pipeline_lib.methods import get_method
from pipeline_lib.modalities.image import code_version
from tasks import compute, tracking, versioning


def _with_files(task, result_keys: tuple[str, ...], *args: Any) -> dict[str, Any]:
    """Call a cached task; if a cached result points at files that are gone (someone cleaned
    the artifacts directory), run it again instead of failing later."""
    result = task(*args)
    if all(Path(result[k]).is_file() for k in result_keys):
        return result
    get_run_logger().warning("%s: cached artifacts missing on disk, recomputing", task.name)
    return task.with_options(refresh_cache=True)(*args)


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


def artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from a free name."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{name}".lower()))[:60].strip(
        "-"
    )


def markdown_table(report: dict[str, Any]) -> str:
    head = "| model | " + " | ".join(SUMMARY_COLUMNS) + " |"
    sep = "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in SUMMARY_COLUMNS) + " |"
        for name, m in report["models"].items()
    ]
    cost = report["cost"]
    return "\n".join(
        [
            head,
            sep,
            *rows,
            "",
            f"unlearning {cost['unlearn_seconds']:.2f}s, retraining {cost['retrain_seconds']:.2f}s, "
            f"ratio {cost['unlearn_over_retrain']:.3f}",
        ]
    )


def stage_data(params: Params, request: DeletionRequest) -> tuple[Params, dict[str, Any]]:
    """Run the DVC stages for this run's parameters.

    The ``data`` keys are synced into the DVC root's params.yaml (as ``dvc exp run -S``
    would) and ``dvc repro prepare`` runs; the request is then checked against the prepared
    data in-process, so a bad request fails with a clear message *before* it is written into
    params.yaml; only then are the ``request`` keys synced and ``dvc repro extract`` runs.
    Returns the params (request.file made relative to the DVC root) and the stage md5s."""
    logger = get_run_logger()
    root = Path(params.tracking.dvc_root).resolve()
    for key in versioning.sync_params_file(root, params, ("data",)):
        logger.info("params.yaml: set %s for DVC", key)
    versioning.dvc_repro(str(root), "prepare")
    validate_request(request, str(params.resolve(params.data.out_dir)))
    rel = versioning.stage_request_file(
        root, str(params.resolve(params.request.file)), request.request_id
    )
    params = replace(params, request=replace(params.request, file=rel))
    for key in versioning.sync_params_file(root, params, ("request",)):
        logger.info("params.yaml: set %s for DVC", key)
    return params, versioning.dvc_repro(str(root), "extract")


def attribution_store_for(
    params: Params, source: str, request_data: dict[str, str]
) -> dict[str, Any]:
    """The store an output-matching method takes its targets from, trained on Ray the first
    time and reused afterwards: ``attribution.n_models`` subset models (datamodels, for dmm;
    independent of the request) or ``oracle_matching.n_oracles`` oracles on the retain set."""
    import numpy as np

    from flows.attribution import ensure_store
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
    return {"root": root, "masks_digest": stats["masks_digest"]}


@task(name="validate-request")
def validate_request(request: DeletionRequest, prepared_dir: str) -> dict[str, int]:
    """Resolve the request against the prepared data; raises RequestError naming the problem."""
    forget, retain = extract_forget_set(request, load_prepared(prepared_dir))
    return {"n_forget": len(forget), "n_retain": len(retain)}


@flow(name="unlearning-pipeline")
def unlearning_pipeline(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one deletion request end to end; returns the MLflow run id and the report."""
    logger = get_run_logger()
    # The environment (MLFLOW_TRACKING_URI, RAY_ADDRESS) applies to deployments too.
    params = load_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    method = get_method(params.unlearn.method)
    tr = params.tracking
    root = Path(tr.dvc_root).resolve()
    request = load_request(str(params.resolve(params.request.file)))
    tracking.check_request_id(tr.mlflow_uri, tr.experiment, request.request_id, request.digest)
    params, md5s = stage_data(params, request)
    data = {
        "prepared_dir": str(params.resolve(params.data.out_dir)),
        "prepared_md5": md5s["prepare"][params.data.out_dir],
    }
    request_data = {
        **data,
        "manifests_dir": str(params.resolve(params.request.out_dir)),
        "manifests_md5": md5s["extract"][params.request.out_dir],
    }
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
            "code_version": code,
            "request_reason": request.reason[:500],
        },
        str(root),
    )
    try:
        tracking.log_lineage(tr.mlflow_uri, run_id, flatten(params), request_data)
        original = _with_files(
            compute.train_model,
            ("path",),
            data,
            "original",
            cfg["model"],
            cfg["train"],
            params.train.seed,
            artifacts,
            code,
        )
        oracle = _with_files(
            compute.train_model,
            ("path",),
            request_data,
            "oracle",
            cfg["model"],
            cfg["train"],
            params.train.oracle_seed,
            artifacts,
            code,
        )
        fisher = None
        if method.needs_fisher:
            fisher = fisher_statistics(params, original)
            tracking.set_tags(
                tr.mlflow_uri,
                run_id,
                {
                    f"stats.fisher_{s}.{k}": str(fisher[f"{s}_{k}"])
                    for s in ("forget", "retain")
                    for k in ("digest", "path")
                },
            )
        store = None
        if method.needs_targets:
            store = attribution_store_for(params, method.needs_targets, request_data)
        unlearned = _with_files(
            compute.unlearn,
            ("path",),
            request_data,
            original,
            cfg["model"],
            cfg["train"],
            cfg["unlearn"],
            fisher_files(fisher),
            artifacts,
            code,
            store,
            cfg["attribution"] if store else None,
        )
        unlearn_seconds = unlearned["seconds"] + (fisher["seconds"] if fisher else 0.0)
        report_dir = params.resolve(params.evaluate.report_dir) / request.request_id / method.name
        report = compute.evaluate(
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
                "title": f"{request.request_id}: {method.name}",
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
                if isinstance(v, int | float)
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
        create_markdown_artifact(
            markdown_table(report),
            key=artifact_key("report", request.request_id),
            description=f"unlearning report, MLflow run {run_id}",
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    logger.info(
        "MLflow run %s: unlearned Avg. Gap %.3f, unlearn/retrain time %.3f",
        run_id,
        report["models"]["unlearned"]["avg_gap"],
        report["cost"]["unlearn_over_retrain"],
    )
    return {"run_id": run_id, "report": report, "report_dir": str(report_dir)}
