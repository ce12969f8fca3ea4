"""Lineage queries over the stores the service writes: the MLflow tracking store (request
runs, their evidence artifacts and tags), the MLflow Model Registry (versions and their
``parent_version``/``request_ids``/``tombstones_count`` tags) and the request ledger
(statuses, events, the forgotten-id index, purges). ``unlearn lineage request|sample|model``
prints what these return.

Nothing here reads the local DVC cache: a request's forgotten ids are on its run
(``evidence/forget_ids.parquet``) and indexed in the ledger
(``unlearnflow_forgotten_ids``), written when the tombstones are appended.

Which versions were trained with a sample ``x`` follows from the tags alone:

- an *exact* version with tag ``tombstones_count = N`` was trained on the data minus the
  first ``N`` rows of the append-only tombstone file, so it holds ``x`` iff ``x`` was never
  tombstoned or its tombstone row index is ``>= N``;
- an *approximate* version derives from its parent's weights: it is ``with`` ``x`` when its
  parent is and its requests did not forget ``x``; ``unlearned`` when its parent held ``x``
  and one of its requests forgot it (approximate removal), or when its parent is
  ``unlearned``; ``without`` when its parent is.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline_lib.service.evidence import render_certificate
from tasks import mlflow_rest
from tasks.mlflow_rest import VersionRecord

if TYPE_CHECKING:  # imported where used: a `lineage sample` against a server needs neither
    import pyarrow as pa
    from mlflow import MlflowClient

    from tasks.ledger import Ledger

#: What a version holds of a sample (see the module docstring).
WITH, WITHOUT, UNLEARNED, UNRELATED = "with", "without", "unlearned", "unknown"
PURGED_TAG = "purged_at"
CERTIFICATE_DIR = "certificate"
CERTIFICATE_FILE = "certificate.html"
#: :data:`tasks.registry.PRODUCTION_ALIAS` (that module imports MLflow; a test checks both).
PRODUCTION_ALIAS = "production"


class LineageError(ValueError):
    """A lineage question cannot be answered: unknown request, model or version, or a
    tracking server that refused or could not be reached."""


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ------------------------------------------------------------------------------- writing


def index_forgotten(
    ledger: Ledger, model_name: str, request_id: str, tombs: pa.Table, forget_ids: Iterable[str]
) -> int:
    """Index the ids ``request_id`` forgot in the ledger, with each id's row in the tombstone
    table ``tombs`` (its first row: the tombstone file is append-only) and its time."""
    wanted = {str(i) for i in forget_ids}
    positions: dict[str, int] = {}
    times: dict[str, str] = {}
    ids = tombs.column("sample_id").to_pylist()
    at = tombs.column("forgotten_at").to_pylist()
    for i, sid in enumerate(ids):
        if sid in wanted and sid not in positions:
            positions[sid] = i
            times[sid] = at[i].astimezone(UTC).isoformat()
    if not positions:
        return 0
    when = max(times.values())
    return ledger.record_forgotten(model_name, request_id, positions, when)


def reindex_forgotten(ledger: Ledger, model_name: str, tombs: pa.Table) -> int:
    """Fill the forgotten-id index from a whole tombstone table (requests processed before
    the index existed): each id under the request that first tombstoned it, at its row.
    Idempotent. Returns the number of rows added."""
    ids = tombs.column("sample_id").to_pylist()
    rids = tombs.column("request_id").to_pylist()
    times = tombs.column("forgotten_at").to_pylist()
    by_request: dict[str, dict[str, int]] = {}
    at: dict[str, str] = {}
    for i, (sid, rid) in enumerate(zip(ids, rids, strict=True)):
        by_request.setdefault(rid, {}).setdefault(sid, i)
        at[rid] = max(at.get(rid, ""), times[i].astimezone(UTC).isoformat())
    return sum(
        ledger.record_forgotten(model_name, rid, positions, at[rid])
        for rid, positions in by_request.items()
    )


#: How MLflow 3.17's UI is told to open the model-training view. Read from its bundle
#: (mlflow/server/js/build/static/js/main.*.js): the experiment kind that picks the view is
#: derived from the global ``workflowType`` behind a feature flag hard-wired on, so the
#: experiment tag ``mlflow.experimentKind`` (:data:`tasks.tracking.EXPERIMENT_KIND`) is not
#: read for it; ``workflowType`` is the URL parameter (``genai`` | ``machine_learning``) or,
#: without one, the browser's stored ``mlflow.workflowType`` (default ``genai``).
UI_VIEW = "workflowType=machine_learning"
#: Where ``mlflow ui`` serves a database or file store by default.
LOCAL_UI = "http://127.0.0.1:5000"


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or one of its runs) in the model-training view:
    on the tracking server of an ``http(s)://`` URI, else where ``mlflow ui`` serves the
    store (:func:`ui_command`)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?{UI_VIEW}"


def ui_command(uri: str) -> str | None:
    """The command that serves a UI for a database or file store (``None`` for a server)."""
    return (
        None if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"
    )


KLOM_SPLITS = ("forget", "retain", "validation")
#: The membership-inference figures of an ensemble row shown on the certificate, each a mean
#: with its std over N models x S seeded draws (``<key>_std``).
ENSEMBLE_MIA = ("MIA_efficacy", "loss_MIA_AUC", "avg_gap")
#: The comparison row of the oracles themselves (pipeline_lib.comparison.summarise).
ORACLE_ROW = "oracle (retrain)"


def _ensemble_mia(metrics: Mapping[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: {"mean": metrics[k], "std": metrics.get(f"{k}_std")}
        for k in ENSEMBLE_MIA
        if k in metrics
    }
    if "mia_seeds" in metrics:
        out["seeds"] = int(metrics["mia_seeds"])
    return out


def klom_evidence(client: MlflowClient, run: Any) -> dict[str, Any] | None:
    """KLoM of the request's method against an oracle ensemble, when ``unlearn evaluate`` was
    run for the request: its newest per-method child run (tags ``request_id``, ``kind =
    evaluation-method``, ``method``) with the noise floor of its parent, and the ensemble's
    membership inference (MIA efficacy, loss-MIA AUC, Avg. Gap: mean and std over N models x
    S seeds) for the method and for the oracles (their sibling row). ``None`` without one."""
    tags = run.data.tags
    rid = tags.get("request_id")
    method = tags.get("method") or run.data.params.get("unlearn.method")
    if not rid or not method or "'" in rid + method:
        return None
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=(
            f"tags.request_id = '{rid}' and tags.kind = 'evaluation-method' "
            f"and tags.method = '{method}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        return None
    child = found[0]
    m = child.data.metrics
    splits = {
        s: {"p95": m[f"klom_{s}_p95"], "mean": m.get(f"klom_{s}_mean")}
        for s in KLOM_SPLITS
        if f"klom_{s}_p95" in m
    }
    if not splits:
        return None
    parent_id = child.data.tags.get("mlflow.parentRunId")
    parent = client.get_run(parent_id) if parent_id else None
    mia = {method: _ensemble_mia(m)}
    if parent_id:
        siblings = client.search_runs(
            [child.info.experiment_id],
            filter_string=(
                f"tags.request_id = '{rid}' and tags.kind = 'evaluation-method' "
                f"and tags.method = '{ORACLE_ROW}'"
            ),
            max_results=50,
        )
        for sib in siblings:
            if sib.data.tags.get("mlflow.parentRunId") == parent_id:
                mia[ORACLE_ROW] = _ensemble_mia(sib.data.metrics)
                break
    pm = parent.data.metrics if parent else {}
    theirs = parent.data.tags.get("dvc.manifests_md5") if parent else None
    ours = tags.get("dvc.manifests_md5")
    return {
        "method": method,
        "run_id": parent_id or child.info.run_id,
        "n_models": int(m["n_models"]) if "n_models" in m else None,
        "splits": splits,
        "noise_floor": {
            s: {"p95": pm.get(f"noise_floor.{s}.p95"), "mean": pm.get(f"noise_floor.{s}.mean")}
            for s in splits
        },
        "manifests_match": (theirs == ours) if theirs and ours else None,
        "mia": {k: v for k, v in mia.items() if v},
    }


def write_certificate(uri: str, run_id: str, report_dir: str, outcome: dict[str, Any]) -> Path:
    """The request's certificate (one self-contained HTML page, plot embedded) from what its
    MLflow run holds and the report in ``report_dir``; written to
    ``<report_dir>/certificate.html``, logged to the run under ``certificate/`` and named by
    the run tag ``certificate.path``. ``outcome``: the request's status and reason (kept as
    the run tags ``certificate.status`` and ``certificate.outcome`` for
    :func:`refresh_certificate`)."""
    client = _client(uri)
    run = client.get_run(run_id)
    tags, params = run.data.tags, run.data.params
    report_path = Path(report_dir) / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    method = tags.get("method", params.get("unlearn.method", ""))
    facts = {
        "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "request": {
            "request_id": tags.get("request_id", ""),
            "reason": tags.get("request_reason", ""),
            "request digest": tags.get("request_digest", ""),
            "status": outcome.get("status", ""),
            "outcome": outcome.get("reason", ""),
        },
        "ids": {
            "forgotten ids": tags.get("forget_ids.count", ""),
            "forgotten ids sha256": tags.get("forget_ids.sha256", ""),
            "retained ids": tags.get("retain_ids.count", ""),
            "retained ids sha256": tags.get("retain_ids.sha256", ""),
            "forgotten ids (artifact)": "evidence/forget_ids.parquet on the MLflow run",
        },
        "versions": {
            "registered model": tags.get("service.model_name", ""),
            "parent version": tags.get("service.parent_version", ""),
            "produced version": tags.get("service.produced_version", "") or "none",
            "data version (DVC md5)": tags.get("dvc.prepared_md5", ""),
            "manifests (DVC md5)": tags.get("dvc.manifests_md5", ""),
            "tombstone set (DVC md5)": tags.get("tombstones.md5", ""),
            "tombstoned ids in total": tags.get("tombstones.count", ""),
            "code version": tags.get("code_version", ""),
        },
        "method": method,
        "method_params": {
            k: v for k, v in sorted(params.items()) if k.startswith(f"unlearn.{method}.")
        },
        "gates": {
            "summary": tags.get("service.gates", ""),
            "passed": tags.get("service.gates_passed") == "true",
            "outcome": outcome.get("reason", ""),
        }
        if "service.gates" in tags
        else None,
        "report": report,
        "oracle_evaluated": "oracle" in report.get("models", {}),
        "klom": klom_evidence(client, run),
        "mlflow": {
            k: v
            for k, v in (
                ("tracking URI", uri),
                ("MLflow run", run_id),
                ("MLflow UI", ui_url(uri, run.info.experiment_id, run_id)),
                ("MLflow UI served by", ui_command(uri)),
            )
            if v
        },
        "prefect": {
            k: v
            for k, v in (
                ("Prefect flow run", tags.get("prefect.flow_run_id")),
                ("Prefect flow run URL", tags.get("prefect.flow_run_url")),
            )
            if v
        },
    }
    plot = Path(report_dir) / "report.png"
    out = Path(report_dir) / CERTIFICATE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_certificate(facts, plot if plot.is_file() else None))
    client.log_artifact(run_id, str(out), artifact_path=CERTIFICATE_DIR)
    client.set_tag(run_id, "certificate.path", str(out))
    client.set_tag(run_id, "certificate.status", str(outcome.get("status", "")))
    client.set_tag(run_id, "certificate.outcome", str(outcome.get("reason", "")))
    return out


def refresh_certificate(uri: str, request_id: str, ledger: Ledger | None = None) -> Path | None:
    """Render again the certificate of a request the deletion service processed (its newest
    run with a ``certificate.path`` tag), e.g. after ``unlearn evaluate`` compared its method
    against an oracle ensemble: the new page carries the ensemble's KLoM and MIA, is written
    over the old one and logged to the run again. The status and outcome are those the first
    rendering recorded (or, for a run rendered before they were, the ledger's). When the
    report folder is gone from this machine, the report is downloaded from the run. ``None``:
    no certificate of ``request_id`` on MLflow."""
    if "'" in request_id:
        return None
    client = _client(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.request_id = '{request_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    run = next(
        (
            r
            for r in runs
            if r.data.tags.get("certificate.path")
            and not r.data.tags.get("kind", "").startswith("evaluation")
        ),
        None,
    )
    if run is None:
        return None
    tags = run.data.tags
    outcome = {"status": tags.get("certificate.status"), "reason": tags.get("certificate.outcome")}
    if outcome["status"] is None and ledger is not None:
        row = ledger.get(request_id)
        events = ledger.events(request_id) if row else []
        outcome = {
            "status": row.status if row else "",
            "reason": events[-1].reason if events else "",
        }
    outcome = {k: v or "" for k, v in outcome.items()}
    report_dir = Path(tags["certificate.path"]).parent
    if not (report_dir / "report.json").is_file():
        import mlflow.artifacts

        report_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="unlearnflow-report-") as tmp:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path="report", dst_path=tmp, tracking_uri=uri
                )
            )
            for f in got.iterdir():
                (report_dir / f.name).write_bytes(f.read_bytes())
    return write_certificate(uri, run.info.run_id, str(report_dir), outcome)


# ------------------------------------------------------------------------------- reading


def _find_run(client: MlflowClient, request_id: str, run_id: str | None):
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            return None
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=f"tags.request_id = '{request_id}'", max_results=1
    )
    return runs[0] if runs else None


def request_lineage(uri: str, ledger: Ledger, request_id: str) -> dict[str, Any]:
    """Everything recorded about one request: ledger status and history, the data, manifest
    and tombstone versions, parent and produced model versions, method and parameters, the
    forget-id count and digest, gates, metrics, the Prefect flow run, the certificate."""
    row = ledger.get(request_id)
    if row is None:
        raise LineageError(f"request {request_id!r} is not in the ledger")
    client = _client(uri)
    out: dict[str, Any] = {
        "request_id": row.request_id,
        "model_name": row.model_name,
        "status": row.status,
        "submitted_at": row.submitted_at,
        "digest": row.digest,
        "parent_version": row.parent_version,
        "produced_version": row.produced_version,
        "error": row.error,
        "history": [
            {"at": e.at, "from": e.from_status, "to": e.to_status, "reason": e.reason}
            for e in ledger.events(request_id)
        ],
        "forgotten_in_index": len(ledger.forgotten(row.model_name, request_id=request_id)),
    }
    run = _find_run(client, request_id, row.mlflow_run_id)
    if run is None:
        out["mlflow"] = None
        return out
    tags, params = run.data.tags, run.data.params
    method = tags.get("method", params.get("unlearn.method"))
    out.update(
        {
            "mlflow": {
                "run_id": run.info.run_id,
                "status": run.info.status,
                "uri": uri,
                "ui_url": ui_url(uri, run.info.experiment_id, run.info.run_id),
                "ui_command": ui_command(uri),
            },
            "data_version": {
                "prepared_md5": tags.get("dvc.prepared_md5"),
                "manifests_md5": tags.get("dvc.manifests_md5"),
                "content_hash": tags.get("data_content_hash"),
            },
            "tombstones": {
                "md5": tags.get("tombstones.md5"),
                "count": tags.get("tombstones.count"),
            },
            "method": method,
            "method_params": {
                k: v for k, v in sorted(params.items()) if k.startswith(f"unlearn.{method}.")
            },
            "forget_ids": {
                "count": tags.get("forget_ids.count"),
                "sha256": tags.get("forget_ids.sha256"),
            },
            "retain_ids": {
                "count": tags.get("retain_ids.count"),
                "sha256": tags.get("retain_ids.sha256"),
            },
            "gates": {
                "summary": tags.get("service.gates"),
                "passed": tags.get("service.gates_passed"),
            },
            "metrics": dict(sorted(run.data.metrics.items())),
            "prefect": {
                "flow_run_id": tags.get("prefect.flow_run_id"),
                "flow_run_name": tags.get("prefect.flow_run_name"),
                "flow_run_url": tags.get("prefect.flow_run_url"),
            },
            "certificate": {
                "path": tags.get("certificate.path"),
                "artifact": f"{CERTIFICATE_DIR}/{CERTIFICATE_FILE}"
                if tags.get("certificate.path")
                else None,
            },
        }
    )
    out["parent_version"] = out["parent_version"] or tags.get("service.parent_version")
    out["produced_version"] = out["produced_version"] or tags.get("service.produced_version")
    return out


def _versions(client: MlflowClient, name: str) -> dict[str, VersionRecord]:
    found: dict[str, VersionRecord] = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=10000, page_token=token)
        for mv in page:
            found[str(mv.version)] = VersionRecord(
                version=str(mv.version),
                tags=dict(mv.tags),
                creation_timestamp=int(mv.creation_timestamp or 0),
                run_id=mv.run_id or None,
                source=mv.source or "",
            )
        token = page.token
        if not token:
            return found


def registry_view(
    uri: str,
    model_name: str,
    via: Literal["auto", "rest", "client"] = "auto",
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, VersionRecord], str | None]:
    """Every version of ``model_name`` with its tags, and the version its production alias
    points at. ``via="auto"``: over the REST API with the standard library for an
    ``http(s)://`` tracking server (no ``import mlflow``: :mod:`tasks.mlflow_rest`); from
    MLflow's tables of a ``sqlite:///`` store with ``sqlite3``, read-only, where
    :mod:`tasks.mlflow_sqlite` has verified the schema; through :class:`mlflow.MlflowClient`
    for any other URI or store, and wherever that reader declines. All give the same records
    (``tests/test_lineage_rest.py``, ``tests/test_lineage.py``)."""
    environ = os.environ if environ is None else environ
    if via == "auto":
        from tasks import mlflow_sqlite

        read = mlflow_sqlite.read_registry(uri, model_name, PRODUCTION_ALIAS, environ)
        if read is not None:
            return read
    if via == "rest" or (via == "auto" and mlflow_rest.use_rest(uri, environ)):
        try:
            server = mlflow_rest.Server.from_env(uri, environ)
            # the model first: a missing one is "not found", not an empty list of versions
            production = mlflow_rest.model_aliases(server, model_name).get(PRODUCTION_ALIAS)
            return mlflow_rest.model_versions(server, model_name), production
        except mlflow_rest.RestError as exc:
            raise LineageError(f"registered model {model_name!r}: {exc}") from exc
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        versions = _versions(client, model_name)
        production = client.get_registered_model(model_name).aliases.get(PRODUCTION_ALIAS)
    except MlflowException as exc:
        raise LineageError(f"registered model {model_name!r}: {exc.message}") from exc
    return versions, None if production is None else str(production)


def version_states(
    versions: Mapping[str, Any], forgotten_index: int | None, forgotten_by: set[str]
) -> dict[str, str]:
    """What each version holds of one sample (``with``, ``without``, ``unlearned``,
    ``unknown`` for a broken chain); ``forgotten_index`` is the sample's first tombstone row
    (``None``: never forgotten) and ``forgotten_by`` the requests that forgot it."""
    states: dict[str, str] = {}

    def state(v: str) -> str:
        if v in states:
            return states[v]
        stack, current = [], v
        # walk up to a known state or an exact version, then fill in downwards (no recursion:
        # chains may be thousands of versions long)
        while current not in states:
            mv = versions.get(current)
            if mv is None:
                states[current] = UNRELATED
                break
            kind = mv.tags.get("kind")
            if kind == "exact":
                n = int(mv.tags.get("tombstones_count", "0") or 0)
                held = forgotten_index is None or forgotten_index >= n
                states[current] = WITH if held else WITHOUT
                break
            parent = mv.tags.get("parent_version")
            if kind != "approximate" or not parent or parent in stack or parent == current:
                states[current] = UNRELATED
                break
            stack.append(current)
            current = parent
        while stack:
            child = stack.pop()
            parent_state = states[versions[child].tags["parent_version"]]
            rids = set(filter(None, versions[child].tags.get("request_ids", "").split(",")))
            if parent_state == WITH and rids & forgotten_by:
                states[child] = UNLEARNED
            else:
                states[child] = parent_state
        return states[v]

    for v in versions:
        state(v)
    return states


def sample_lineage(
    uri: str,
    ledger: Ledger,
    model_name: str,
    sample_id: str,
    via: Literal["auto", "rest", "client"] = "auto",
) -> dict[str, Any]:
    """Which requests forgot ``sample_id`` and when; which versions of ``model_name`` were
    trained with it (or derive from weights that were), which unlearned it approximately and
    which were trained without it; which artifacts still hold it (weights of ``with``
    versions that no purge deleted)."""
    rows = ledger.forgotten(model_name, sample_id)
    first = min((r.tombstone_index for r in rows), default=None)
    by = {r.request_id for r in rows}
    versions, production = registry_view(uri, model_name, via)
    states = version_states(versions, first, by)
    listing = []
    for v in sorted(versions, key=int):
        mv = versions[v]
        listing.append(
            {
                "version": v,
                "kind": mv.tags.get("kind"),
                "state": states[v],
                "parent_version": mv.tags.get("parent_version"),
                "request_ids": mv.tags.get("request_ids"),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
                    timespec="seconds"
                ),
                "purged_at": mv.tags.get(PURGED_TAG),
                "production": production == v,
            }
        )
    holding = [v["version"] for v in listing if v["state"] == WITH and not v["purged_at"]]
    return {
        "sample_id": sample_id,
        "model_name": model_name,
        "forgotten": bool(rows),
        "forgotten_by": [
            {"request_id": r.request_id, "at": r.at, "tombstone_index": r.tombstone_index}
            for r in rows
        ],
        "trained_with": [v["version"] for v in listing if v["state"] == WITH],
        "unlearned_in": [v["version"] for v in listing if v["state"] == UNLEARNED],
        "trained_without": [v["version"] for v in listing if v["state"] == WITHOUT],
        "holding_artifacts": holding if rows else [],
        "versions": listing,
    }


def model_lineage(uri: str, ledger: Ledger, name: str, version: str) -> dict[str, Any]:
    """The chain from ``name@version`` (a number or ``production``) back to the last exact
    version: each step's kind, requests (with their ledger status), method, data version
    and tombstone set."""
    from mlflow.exceptions import MlflowException

    from tasks import registry

    client = _client(uri)
    try:
        if not version.isdigit():
            version = str(client.get_model_version_by_alias(name, version).version)
        chain = registry.version_chain(uri, name, version)
    except (MlflowException, registry.RegistryError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise LineageError(f"{name}@{version}: {message}") from exc
    steps = []
    for mv in chain:
        rids = [r for r in mv.tags.get("request_ids", "").split(",") if r]
        count = mv.tags.get("tombstones_count")
        if count is None and mv.run_id:  # approximate versions: on the producing run
            try:
                count = client.get_run(mv.run_id).data.tags.get("tombstones.count")
            except MlflowException:
                count = None
        statuses = {}
        for rid in rids:
            row = ledger.get(rid)
            statuses[rid] = row.status if row else "not in ledger"
        steps.append(
            {
                "version": str(mv.version),
                "kind": mv.tags.get("kind"),
                "parent_version": mv.tags.get("parent_version"),
                "requests": statuses,
                "method": mv.tags.get("method")
                or ("exact retrain" if mv.tags.get("kind") == "exact" else None),
                "data_version": mv.tags.get("data_version"),
                "tombstones_md5": mv.tags.get("tombstones_md5"),
                "tombstones_count": count,
                "run_id": mv.run_id,
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
                    timespec="seconds"
                ),
                "purged_at": mv.tags.get(PURGED_TAG),
            }
        )
    return {"model_name": name, "version": version, "chain": steps}


def read_forget_ids(uri: str, run_id: str) -> list[str]:
    """The forgotten ids of a request run, from its ``evidence/forget_ids.parquet`` artifact
    (no local DVC cache needed)."""
    import mlflow.artifacts
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="unlearnflow-evidence-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path="evidence/forget_ids.parquet",
            dst_path=tmp,
            tracking_uri=uri,
        )
        return [str(i) for i in pq.read_table(path).column("sample_id").to_pylist()]
