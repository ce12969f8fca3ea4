"""The deletion service as Prefect flows: the sweep (every pending request of the ledger,
in arrival order, each exactly once, each unlearned from the current production version)
and the periodic exact retrain of the production model.

Exactly once: a request is *claimed* in the ledger (``pending → processing`` in one database
transaction that also refuses a second request of the same model in flight), so two sweeps
started at once never process the same request, and requests of one model run one after
the other. The per-request work is a Prefect task whose cache key is the request's id,
content digest and ledger entry (a replayed claim of a request that already finished
returns the recorded result instead of registering a second version). A failing request is
marked ``failed`` with its error; a request that does not fit the data is ``rejected``; the
sweep goes on with the next one.

The same flows run as deployments (``infra/prefect.yaml``: the sweep on a cron schedule, the
exact retrain weekly) or from the CLI (``unlearn sweep``, ``unlearn retrain-production``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from prefect import flow, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.logging import get_run_logger

from pipeline_lib.config import environment_overrides
from pipeline_lib.modalities import Modality, modality_for_params
from tasks.ledger import Ledger, default_owner, ledger_url
from tasks.results import persisted
from tasks.service import is_input_error, process_request, train_exact


def open_service(
    params_path: str, overrides: dict[str, Any] | None
) -> tuple[Modality, Any, Ledger]:
    """The modality, params (environment applied) and ledger of a params file."""
    modality = modality_for_params(params_path)
    params = modality.load_params(
        params_path, {**environment_overrides(os.environ), **(overrides or {})}
    )
    url = ledger_url(params.tracking.mlflow_uri, params.service.ledger_url)
    return modality, params, Ledger(url)


def _request_key(context: Any, parameters: dict[str, Any]) -> str:
    # The ledger entry, not only the request: the same id and content in another ledger (a
    # second store, or this one reset) is other work, never served from this one's outcome.
    row = parameters["row"]
    entry = f"{parameters['ledger_db']}|{row.seq}|{row.submitted_at}"
    ledger = hashlib.sha256(entry.encode()).hexdigest()[:16]
    return f"unlearnflow-request-{row.model_name}-{row.request_id}-{row.digest}-{ledger}"


@task(
    name="process-request",
    **persisted(CacheKeyFnPolicy(cache_key_fn=_request_key)),
)
def process_request_task(modality_name: str, params: Any, row: Any, ledger_db: str) -> dict:
    """One claimed request, end to end (:func:`tasks.service.process_request`). Cached by
    request id, content digest and ledger entry: replaying a finished request returns its
    recorded outcome; it never produces a second version."""
    from pipeline_lib.modalities import get_modality

    ledger = Ledger(ledger_db)
    try:
        out = process_request(get_modality(modality_name), params, row, ledger)
    finally:
        ledger.close()
    return out


@flow(name="deletion-sweep")
def sweep_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    max_requests: int | None = None,
) -> dict[str, Any]:
    """Process the pending requests of the params file's production model, oldest first.
    Returns what happened to each (``processed``), the requests recovered from dead sweeps
    and those still pending when it ends (``pending``: another sweep is processing a request
    of the model, or ``max_requests`` was reached). A sweep with nothing pending does
    nothing (not even train a first version)."""
    logger = get_run_logger()
    modality, params, ledger = open_service(params_path, overrides)
    model = params.service.model_name
    owner = default_owner()
    out: dict[str, Any] = {"model": model, "processed": [], "recovered": [], "pending": []}
    try:
        for row in ledger.recover_stale(model):
            logger.warning("%s: left processing by a dead sweep; marked failed", row.request_id)
            out["recovered"].append(row.request_id)
        if not ledger.list(status="pending", model_name=model):
            logger.info("%s: no pending request", model)
            return out
        # The first production version is trained by the request that needs it, under its
        # claim (process_request): sweeps started at once on a model without one would each
        # train and register a first version here, and race on creating MLflow's tables.
        while max_requests is None or len(out["processed"]) < max_requests:
            row = ledger.claim_next(model, owner)
            if row is None:
                break
            logger.info("%s: processing %s (arrival #%d)", model, row.request_id, row.seq)
            try:
                result = process_request_task(modality.name, params, row, ledger.url)
            except KeyboardInterrupt:  # SIGINT/SIGTERM (tasks/interruption.py): record, stop
                current = ledger.get(row.request_id)
                if current is not None and current.status == "processing":
                    ledger.transition(
                        row.request_id,
                        "failed",
                        "interrupted by a signal while processing; `unlearn requests retry`",
                        error="interrupted",
                    )
                raise
            except Exception as exc:  # recorded in the ledger; the next request goes on
                status = "rejected" if is_input_error(exc) else "failed"
                reason = f"{type(exc).__name__}: {exc}"
                result = {"request_id": row.request_id, "status": status, "error": reason}
                current = ledger.get(row.request_id)
                if current is not None and current.status != "processing":
                    # raised after its outcome was recorded: that outcome stands (a final
                    # state cannot become failed, and the sweep must go on)
                    result.update(
                        status=current.status,
                        parent_version=current.parent_version,
                        produced_version=current.produced_version,
                    )
                else:
                    ledger.transition(row.request_id, status, reason[:2000], error=reason[:8000])
                logger.error("%s: %s: %s", row.request_id, result["status"], reason)
            else:
                current = ledger.get(row.request_id)
                if current is not None and current.status == "processing":
                    # a replayed claim served from the task cache: record the outcome again
                    ledger.transition(
                        row.request_id,
                        result["status"],
                        "outcome recorded by an earlier run of this request",
                        mlflow_run_id=result["run_id"],
                        parent_version=result["parent_version"],
                        produced_version=result["produced_version"],
                    )
            out["processed"].append(result)
        out["pending"] = [r.request_id for r in ledger.list(status="pending", model_name=model)]
    finally:
        ledger.close()
    logger.info(
        "%s: sweep processed %d request(s): %s",
        model,
        len(out["processed"]),
        ", ".join(f"{r['request_id']}={r['status']}" for r in out["processed"]) or "none",
    )
    return out


@flow(name="retrain-production")
def retrain_production_flow(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train the production model from scratch on the data minus all tombstones and register
    it as an exact version (the end of the chain of approximate versions). Requests marked
    ``needs-retrain`` are done once it is in production."""
    logger = get_run_logger()
    modality, params, ledger = open_service(params_path, overrides)
    try:
        result = train_exact(modality, params, "periodic exact retrain")
        closed = []
        for row in ledger.list(status="needs-retrain", model_name=params.service.model_name):
            ledger.transition(
                row.request_id,
                "done",
                f"forgotten by exact version {result['version']}",
                produced_version=result["version"],
            )
            closed.append(row.request_id)
    finally:
        ledger.close()
    logger.info(
        "%s: exact version %s in production; %d needs-retrain request(s) closed",
        params.service.model_name,
        result["version"],
        len(closed),
    )
    return {"version": result["version"], "run_id": result["run_id"], "closed": closed}
