"""The language-model unlearning pipeline as a Prefect flow.

prepare the corpus → extract the forget documents (the DVC stages of ``lm/dvc.yaml``, via
``dvc repro``) → train the original LM → train the retrain-from-scratch oracle → unlearn →
evaluate (perplexities, loss-MIA AUC, memorisation, gaps to the oracle) → one MLflow parent
run named after the request id, in the image pipeline's format.

The ``text`` and ``request`` sections of the run's parameters are synced into the DVC
root's ``params-lm.yaml`` (the file the LM stages read) before the stages run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from flows.pipeline import _with_files
from pipeline_lib.config import flatten, replace, to_dict
from pipeline_lib.config.text import LMParams, environment_overrides, load_lm_params
from pipeline_lib.data.requests import DeletionRequest, load_request
from pipeline_lib.data.text import MANIFESTS_DIR, PREPARED_DIR, extract_forget_docs, load_corpus
from pipeline_lib.methods.text import get_lm_method
from pipeline_lib.modalities.image import code_version
from pipeline_lib.modalities.text import LM_SUMMARY_COLUMNS
from tasks import lm as lm_tasks
from tasks import tracking, versioning

LM_PARAMS_FILE = "params-lm.yaml"
LM_DVC = "lm/dvc.yaml"
LM_LOCK = "lm/dvc.lock"


@task(name="validate-text-request")
def validate_text_request(request: DeletionRequest, prepared_dir: str) -> dict[str, int]:
    """Resolve the request against the prepared corpus; raises RequestError naming the problem."""
    forget, retain = extract_forget_docs(request, load_corpus(prepared_dir))
    return {"n_forget": len(forget), "n_retain": len(retain)}


def stage_text(params: LMParams, request: DeletionRequest) -> tuple[LMParams, dict[str, Any]]:
    """Sync ``text`` into params-lm.yaml, ``dvc repro`` prepare; check the request against the
    corpus in-process (a bad request fails before it is written anywhere); then sync
    ``request`` and ``dvc repro`` extract. Returns the params and the stage md5s."""
    logger = get_run_logger()
    root = Path(params.tracking.dvc_root).resolve()
    for key in versioning.sync_params_file(root, params, ("text",), LM_PARAMS_FILE):
        logger.info("%s: set %s for DVC", LM_PARAMS_FILE, key)
    versioning.dvc_repro(str(root), f"{LM_DVC}:prepare", LM_LOCK)
    validate_text_request(request, str(root / PREPARED_DIR))
    rel = versioning.stage_request_file(
        root, str(params.resolve(params.request.file)), request.request_id
    )
    params = replace(params, request=replace(params.request, file=rel))
    for key in versioning.sync_params_file(root, params, ("request",), LM_PARAMS_FILE):
        logger.info("%s: set %s for DVC", LM_PARAMS_FILE, key)
    return params, versioning.dvc_repro(str(root), f"{LM_DVC}:extract", LM_LOCK)


def markdown_table(report: dict[str, Any]) -> str:
    head = "| model | " + " | ".join(LM_SUMMARY_COLUMNS) + " |"
    sep = "|---" * (len(LM_SUMMARY_COLUMNS) + 1) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in LM_SUMMARY_COLUMNS) + " |"
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
            f"ratio {cost['unlearn_over_retrain']:.4f}",
        ]
    )


def _md5(md5s: dict[str, Any], stage: str, out: str) -> str:
    outs = md5s[stage]
    return outs.get(out) or outs[next(k for k in outs if k.endswith(out))]


@flow(name="lm-unlearning-pipeline")
def lm_unlearning_pipeline(
    params_path: str = LM_PARAMS_FILE, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one deletion request against a language model end to end; returns the MLflow
    run id and the report."""
    logger = get_run_logger()
    params = load_lm_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    method = get_lm_method(params.unlearn.method)
    tr = params.tracking
    root = Path(tr.dvc_root).resolve()
    request = load_request(str(params.resolve(params.request.file)))
    tracking.check_request_id(tr.mlflow_uri, tr.experiment, request.request_id, request.digest)
    params, md5s = stage_text(params, request)
    data = {
        "prepared_dir": str(root / PREPARED_DIR),
        "prepared_md5": _md5(md5s, "prepare", PREPARED_DIR),
    }
    request_data = {
        **data,
        "manifests_dir": str(root / MANIFESTS_DIR),
        "manifests_md5": _md5(md5s, "extract", MANIFESTS_DIR),
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
            "pipeline": "lm",
            "code_version": code,
            "request_reason": request.reason[:500],
        },
        str(root),
    )
    try:
        lm_tasks.log_text_lineage(tr.mlflow_uri, run_id, flatten(params), request_data)
        train_args = (cfg["lm"], cfg["train"])
        original = _with_files(
            lm_tasks.train_lm,
            ("path",),
            data,
            "original",
            *train_args,
            params.train.seed,
            artifacts,
            code,
        )
        oracle = _with_files(
            lm_tasks.train_lm,
            ("path",),
            request_data,
            "oracle",
            *train_args,
            params.train.oracle_seed,
            artifacts,
            code,
        )
        needs_oracle = method.needs_oracle(params.unlearn.method_params())
        unlearned = _with_files(
            lm_tasks.unlearn_lm,
            ("path",),
            request_data,
            original,
            oracle if needs_oracle else None,
            *train_args,
            cfg["unlearn"],
            params.evaluate.batch_size,
            artifacts,
            code,
        )
        report_dir = params.resolve(params.evaluate.report_dir) / request.request_id / method.name
        report = lm_tasks.evaluate_lm(
            request_data,
            params,
            {
                "original": original["path"],
                "oracle": oracle["path"],
                "unlearned": unlearned["path"],
            },
            unlearned["seconds"],
            oracle["seconds"],
            str(report_dir),
            {
                "title": f"{request.request_id}: {method.name} (LM)",
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
        create_markdown_artifact(
            markdown_table(report),
            key=f"lm-report-{request.request_id.lower()}".replace("_", "-").replace(".", "-")[:60],
            description=f"LM unlearning report, MLflow run {run_id}",
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    u = report["models"]["unlearned"]
    logger.info(
        "MLflow run %s: forget ppl %.3f (oracle gap %+.1f%%), held-out ppl change %+.1f%%, "
        "unlearn/retrain time %.4f",
        run_id,
        u["ppl_forget"],
        100 * u["ppl_forget_rel_gap"],
        100 * u["ppl_heldout_change"],
        report["cost"]["unlearn_over_retrain"],
    )
    return {"run_id": run_id, "report": report, "report_dir": str(report_dir)}
