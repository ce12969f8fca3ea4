"""Retention: ``unlearn purge`` deletes what still holds forgotten data once the retention
window (``service.retention_days``, or ``--older-than DAYS``) has passed since the ids were
tombstoned, and records every deletion in the ledger (``unlearnflow_purges``: what, when,
why) and on the purged registry versions (tag ``purged_at``).

What holds a forgotten id ``x`` (see :mod:`tasks.lineage` for the rule per version):

- the weights of every registered version *trained with* ``x`` (state ``with``): its
  registry files (``model/`` of its run), the copies logged on request runs
  (``models/<role>-<digest>.safetensors``), the local content-addressed files under
  ``tracking.artifacts_dir`` (``models/``, ``registry/<name>/v<N>/``);
- the oracle and unlearned weights of request runs that were trained on, or derived from,
  weights holding ``x`` without forgetting it;
- Prefect result records (``.prefect-results``) naming those weight files;
- the rows themselves, wherever the pipeline stored them: the prepared data (``data.out_dir``
  and the variants under ``runs/<modality>/data-<key>/``), the Parquet shards of the
  statistics and attribution stores under ``tracking.artifacts_dir``, and every DVC cache
  file that holds one of them (with the ``.dir`` entries that list such a file).

Before the rows are deleted the data is **re-versioned**: the ids join the purge list
(``runs/<modality>/purged_ids.parquet``, ids only) and the current data settings are prepared
again through a stage that depends on that list and leaves its ids out
(:func:`tasks.versioning.stage_prepare`). From then on every run, request and exact retrain
uses that version; the purge records its path and md5. A hand-run ``dvc repro prepare`` of
the root stage would read the source again, rows included: the pipeline never runs it once
the purge list exists.

What is deliberately kept:

- the *production* version, even when it still holds ``x`` (keep-parent after failed gates):
  the purge reports it, and ``unlearn retrain-production`` is the fix;
- versions that *unlearned* ``x`` (approximate removal): they are the deletion's result;
- the data *source* (the ``sklearn`` package's digits, the Fashion-MNIST IDX files, the
  user's Parquet table at ``data.path``): it is outside the pipeline's stores; deleting the
  rows there is the data owner's step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from safetensors import safe_open

from pipeline_lib.io import atomic_path
from pipeline_lib.service.evidence import retention_due
from tasks import lineage, registry, versioning
from tasks.ledger import Forgotten, Ledger

log = logging.getLogger(__name__)


def _weights_digest(path: Path) -> str | None:
    """The state digest in a safetensors file's metadata (``None`` when unreadable)."""
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return (fh.metadata() or {}).get("digest")
    except Exception:  # not safetensors, truncated: not ours to judge
        return None


def _model_runs(client: MlflowClient, model: str) -> list[Any]:
    """Every run of the service's model (request runs and exact retrains)."""
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`service.model_name` = '{model}'",
        max_results=50000,
    )


def _holding_digests(
    ledger: Ledger,
    model: str,
    due: list[Forgotten],
    versions: dict[str, Any],
    production: str | None,
    runs: list[Any],
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """The weights that hold a due id: ``({digest: why}, {version: why}, notes)``;
    the production version is never included (a note says so)."""
    by_request: dict[str, int] = {}
    for f in due:
        by_request[f.request_id] = min(f.tombstone_index, by_request.get(f.request_id, 1 << 62))
    digests: dict[str, str] = {}
    purge_versions: dict[str, str] = {}
    notes: list[str] = []
    # tombstones before each request run: its tag (count after) less the ids it added
    before = {
        run.info.run_id: int(run.data.tags["tombstones.count"])
        - len(ledger.forgotten(model, request_id=run.data.tags["request_id"]))
        for run in runs
        if "tombstones.count" in run.data.tags and run.data.tags.get("request_id")
    }
    for rid, index in sorted(by_request.items()):
        states = lineage.version_states(versions, index, {rid})
        why = f"trained with ids forgotten by {rid}"
        for v, state in states.items():
            if state != lineage.WITH or versions[v].tags.get(lineage.PURGED_TAG):
                continue
            if v == production:
                notes.append(
                    f"production version v{v} still holds ids forgotten by {rid}: kept; "
                    "run `unlearn retrain-production`"
                )
                continue
            purge_versions.setdefault(v, why)
            if versions[v].tags.get("state_digest"):
                digests.setdefault(versions[v].tags["state_digest"], f"v{v} {why}")
        # request runs: oracle trained on data that still held the id; unlearned weights
        # derived from a parent that held it, by a request that did not forget it
        for run in runs:
            tags = run.data.tags
            q = tags.get("request_id")
            if not q or q == rid or run.info.run_id not in before:
                continue
            parent = tags.get("service.parent_version")
            oracle = tags.get("weights.oracle.digest")
            if oracle and index >= before[run.info.run_id]:
                digests.setdefault(oracle, f"oracle of {q}, {why}")
            unlearned = tags.get("weights.unlearned.digest")
            if unlearned and parent and states.get(parent) == lineage.WITH:
                produced = tags.get("service.produced_version")
                if produced != production:
                    digests.setdefault(unlearned, f"unlearned weights of {q}, {why}")
    if production and production in versions:  # never delete what is in service
        digests.pop(versions[production].tags.get("state_digest", ""), None)
    return digests, purge_versions, notes


#: (id column, content column) of the Parquet tables that hold data rows: prepared images
#: and statistics shards (``features``), prepared corpora (``text``). Manifests, tombstones
#: and the purge list hold ids only.
ROW_TABLES = (("sample_id", "features"), ("doc_id", "text"))


def _rows_held(path: Path, ids: set[str]) -> int:
    """How many of ``ids`` the Parquet data table at ``path`` holds rows of (0 for anything
    else: not Parquet, unreadable, a table of ids only)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PAR1":
                return 0
        names = set(pq.read_schema(path).names)
        col = next((i for i, c in ROW_TABLES if i in names and c in names), None)
        if col is None:
            return 0
        held = pq.read_table(path, columns=[col]).column(0).to_pylist()
    except (OSError, pa.ArrowException):
        return 0
    return sum(1 for s in held if s in ids)


def update_purge_list(
    root: Path, modality: Any, due: list[Forgotten], now: datetime, dry_run: bool
) -> tuple[set[str], int]:
    """Add the due ids to the modality's purge list (ids only, atomically); returns (every id
    on the list, how many were new)."""
    path = root / versioning.purged_ids_path(modality)
    old = pq.read_table(path) if path.is_file() else None
    listed = set(old.column("sample_id").to_pylist()) if old is not None else set()
    new = sorted(
        {f.sample_id: f for f in due if f.sample_id not in listed}.values(),
        key=lambda f: f.sample_id,
    )
    if new and not dry_run:
        rows = pa.table(
            {
                "sample_id": pa.array([f.sample_id for f in new], pa.string()),
                "request_id": pa.array([f.request_id for f in new], pa.string()),
                "model_name": pa.array([f.model_name for f in new], pa.string()),
                "purged_at": pa.array([now.isoformat()] * len(new), pa.string()),
            }
        )
        table = pa.concat_tables([old, rows]) if old is not None else rows
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    return listed | {f.sample_id for f in new}, len(new)


def _row_copies(stores: Iterable[Path], ids: set[str]) -> list[tuple[Path, int]]:
    """Workspace copies of the rows: every ``*.parquet`` data table under ``stores`` holding
    one of ``ids``, as (what to delete, rows held): a prepared or shard directory (it has
    ``meta.json`` / ``shards.json``) goes whole, so no half directory passes for complete."""
    found: dict[Path, int] = {}
    for store in stores:
        if not store.is_dir():
            continue
        for path in sorted(store.rglob("*.parquet")):
            n = _rows_held(path, ids)
            if n:
                d = path.parent
                target = d if (d / "meta.json").is_file() or (d / "shards.json").is_file() else path
                found[target] = found.get(target, 0) + n
    return sorted(found.items())


def _cache_copies(root: Path, ids: set[str]) -> tuple[list[tuple[Path, int]], list[Path]]:
    """DVC cache files holding rows of ``ids``, and the ``.dir`` entries that list one."""
    cache = root / ".dvc" / "cache" / "files" / "md5"
    if not cache.is_dir():
        return [], []
    files = [p for p in sorted(cache.glob("*/*")) if p.is_file()]
    held = [(p, n) for p in files if not p.name.endswith(".dir") for n in [_rows_held(p, ids)] if n]
    gone = {p.parent.name + p.name for p, _ in held}
    dirs = []
    for p in files:
        if p.name.endswith(".dir"):
            try:
                members = {e["md5"] for e in json.loads(p.read_text())}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if members & gone:
                dirs.append(p)
    return held, dirs


def purge(
    uri: str,
    ledger: Ledger,
    model: str,
    older_than_days: float,
    artifacts_dir: str | Path,
    dvc_root: str | Path,
    results_dir: str | Path | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    modality: Any = None,
    params: Any = None,
    data_stores: Iterable[str | Path] = (),
) -> dict[str, Any]:
    """Delete what holds ids of ``model`` tombstoned more than ``older_than_days`` ago (see
    the module docstring); returns what was (or, with ``dry_run``, would be) deleted.

    ``modality`` and ``params`` (the service's): re-version its prepared data without the
    rows first. ``data_stores``: more directories the pipeline writes data rows to (the
    prepared data, the statistics and attribution stores), searched with ``runs/`` and
    ``artifacts_dir``."""
    now = now or datetime.now(UTC)
    due = [f for f in ledger.forgotten(model) if retention_due(f.at, older_than_days, now)]
    out: dict[str, Any] = {
        "model_name": model,
        "older_than_days": older_than_days,
        "due_ids": len(due),
        "due_requests": sorted({f.request_id for f in due}),
        "deleted": [],
        "kept": [],
        "dry_run": dry_run,
    }
    if not due:
        return out
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = lineage._versions(client, model)
    try:
        production = client.get_registered_model(model).aliases.get(registry.PRODUCTION_ALIAS)
    except MlflowException:
        production = None
    production = str(production) if production is not None else None
    runs = _model_runs(client, model)
    digests, purge_versions, notes = _holding_digests(
        ledger, model, due, versions, production, runs
    )
    out["kept"] += notes
    deleted: list[dict[str, str]] = []

    def record(kind: str, target: str, why: str) -> None:
        deleted.append({"kind": kind, "target": target, "reason": why})
        if not dry_run:
            ledger.record_purge(model, kind, target, f"retention {older_than_days:g} days: {why}")

    # 1. registry versions: their files (model/ of the producing run) and a purged tag
    for v, why in sorted(purge_versions.items(), key=lambda kv: int(kv[0])):
        mv = versions[v]
        if not dry_run:
            try:
                run = client.get_run(mv.run_id)
                get_artifact_repository(run.info.artifact_uri).delete_artifacts("model")
            except (MlflowException, OSError, FileNotFoundError) as exc:
                log.warning("v%s: could not delete its artifacts: %s", v, exc)
            client.set_model_version_tag(model, v, lineage.PURGED_TAG, now.isoformat())
            client.set_model_version_tag(model, v, "purged_reason", why[:500])
        record("registry-version", f"{model} v{v} ({mv.source})", why)

    # 2. weight copies on runs (models/<role>-<digest16>.safetensors; the parent's copy keeps
    # its registry name, weights.safetensors, and is told by the run's weights.<role>.digest)
    for run in runs:
        repo = None
        try:
            files = [f.path for f in client.list_artifacts(run.info.run_id, "models")]
        except (MlflowException, OSError):
            continue
        roles = {
            k.split(".")[1]: v
            for k, v in run.data.tags.items()
            if k.startswith("weights.") and k.endswith(".digest")
        }
        named = {
            f: next((d for d in roles.values() if Path(f).stem.endswith(d[:16])), None)
            for f in files
        }
        left = set(roles.values()) - set(named.values())
        for f, digest in named.items():
            if digest is None and len(left) == 1 and sum(v is None for v in named.values()) == 1:
                digest = next(iter(left))
            if digest not in digests:
                continue
            if not dry_run:
                repo = repo or get_artifact_repository(run.info.artifact_uri)
                repo.delete_artifacts(f)
            record("mlflow-artifact", f"runs:/{run.info.run_id}/{f}", digests[digest])

    # 3. local weight files and Prefect result records that name them
    names: list[str] = []
    for path in sorted(Path(artifacts_dir).rglob("*.safetensors")):
        digest = _weights_digest(path)
        if digest in digests:
            names.append(str(path))
            if not dry_run:
                path.unlink()
            record("local-weights", str(path), digests[digest])
    if results_dir and Path(results_dir).is_dir():
        for path in sorted(p for p in Path(results_dir).rglob("*") if p.is_file()):
            try:
                text = path.read_text(errors="ignore")
            except OSError:
                continue
            hit = next((d for d in digests if d in text), None) or next(
                (n for n in names if n in text), None
            )
            if hit:
                if not dry_run:
                    path.unlink()
                record("prefect-result", str(path), f"names purged weights ({hit[:16]})")

    # 4. the rows: a new data version without them, then every stored copy of them
    root = Path(dvc_root)
    ids = {f.sample_id for f in due}
    if modality is not None:
        listed, added = update_purge_list(root, modality, due, now, dry_run)
        ids |= listed
        if added:
            rel = versioning.purged_ids_path(modality)
            if dry_run:
                record("prepared-data", f"{rel} (+{added} id(s))", "would prepare the data again")
            else:
                prepared, md5 = versioning.stage_prepare(modality, params, root, versioning.repro)
                record(
                    "prepared-data",
                    f"{prepared} ({md5})",
                    f"new data version without the {len(listed)} id(s) of {rel} ({added} new)",
                )
                out["prepared"] = {"path": prepared, "md5": md5, "purged_ids": len(listed)}
    stores = [root / versioning.RUNS_DIR, Path(artifacts_dir), *map(Path, data_stores)]
    for path, n in _row_copies(stores, ids):
        if not dry_run:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        record("data-copy", str(path), f"holds {n} row(s) of forgotten ids")
    held, dirs = _cache_copies(root, ids)
    for path, n in held:
        if not dry_run:
            path.unlink()
        record("dvc-cache", str(path), f"holds {n} row(s) of forgotten ids")
    for path in dirs:
        if not dry_run:
            path.unlink()
        record("dvc-cache", str(path), "data version listing a deleted file")
    if modality is None:
        out["kept"].append(
            "the prepared data was not re-versioned (no modality given); the next run "
            "prepares it again from the source"
        )
    out["deleted"] = deleted
    return out


def results_dir_from_env() -> str | None:
    """Prefect's local result storage (``PREFECT_RESULTS_LOCAL_STORAGE_PATH``, else the
    project's ``.prefect-results`` when it exists)."""
    env = os.environ.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH")
    if env:
        return env
    local = Path(".prefect-results")
    return str(local.resolve()) if local.is_dir() else None


def summary_lines(out: dict[str, Any]) -> Iterable[str]:
    verb = "would delete" if out["dry_run"] else "deleted"
    yield (
        f"{out['model_name']}: {out['due_ids']} id(s) of {len(out['due_requests'])} request(s) "
        f"forgotten more than {out['older_than_days']:g} day(s) ago"
    )
    wrote = "would write" if out["dry_run"] else "wrote"  # the new data version
    for d in out["deleted"]:
        v = wrote if d["kind"] == "prepared-data" else verb
        yield f"  {v} {d['kind']:<17} {d['target']}  ({d['reason']})"
    if not out["deleted"]:
        yield "  nothing to delete"
    for k in out["kept"]:
        yield f"  kept: {k}"
