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

from pipeline_lib.config import environment_overrides, flatten, to_dict
from pipeline_lib.data.requests import load_request
from pipeline_lib.io import code_version
from pipeline_lib.modalities import modality_for_params
from tasks import compute, tracking, versioning
from tasks.compute import with_files
from tasks.method_inputs import fisher_metrics, request_cost_block, unlearn_with_inputs


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
        tracking.log_evidence(tr.mlflow_uri, run_id, request_data["manifests_dir"])
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
        unlearned, fisher, unlearn_seconds = unlearn_with_inputs(
            modality, params, method, original, oracle, request_data, run_id, artifacts, code
        )
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
                **({"cost": request_cost_block(fisher, unlearned["seconds"])} if fisher else {}),
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
