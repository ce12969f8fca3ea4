"""The Model Registry of an MLflow SQLite store, read with the standard library's ``sqlite3``
(read-only), for ``unlearn lineage sample`` on the embedded default (``sqlite:///...``).

A fresh ``unlearn lineage sample`` process spent most of its time importing MLflow and
setting up its SQLAlchemy store (``import mlflow`` loads its GenAI, data and server
packages: about 2 s of a 3.3 s process on an idle machine) to read two things: every version
of one registered model with its tags, and the model's ``production`` alias. This module
reads those rows from MLflow's own tables instead. These tables are MLflow's storage, not
its API, so the read is guarded; :func:`read_registry` returns ``None`` (and the caller uses
:class:`mlflow.MlflowClient`, as before) whenever anything is not exactly as verified:

- the URI is not a plain ``sqlite:///<file>`` (no query string, no in-memory database), or
  the file does not exist or cannot be opened read-only;
- the database's alembic revision (``alembic_version``) is not one in
  :data:`VERIFIED_REVISIONS`: the schemas this code was checked against
  (``tests/test_lineage.py`` compares its answer with the MLflow client's on a registry
  MLflow itself wrote, and fails when the installed MLflow writes a revision not listed);
- MLflow's workspaces are switched on (``MLFLOW_ENABLE_WORKSPACES``), or any registered
  model lives outside the ``default`` workspace (the client refuses such a store when
  workspaces are off);
- the model does not exist, its name holds a quote, or any of its versions is tagged as a
  prompt (MLflow's search leaves prompts out; the client gives those answers and errors);
- any ``sqlite3`` error.

What it reads is what the client returns for ``search_model_versions("name = '<model>'")``
and ``get_registered_model(<model>).aliases``: the versions not in MLflow's internal deleted
stage, each with its tags, creation time, run id and source. The connection is opened with
``mode=ro`` and ``PRAGMA query_only``, and all rows come from one read transaction (one
snapshot). Nothing is written and no file is created.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from tasks.mlflow_rest import VersionRecord

#: Alembic revisions of MLflow's tracking database whose registry tables (``registered_models``,
#: ``model_versions``, ``model_version_tags``, ``registered_model_aliases``, with their
#: ``workspace`` columns) were checked against this reader: ``dc11669786a5`` is the head of
#: MLflow 3.17's migrations.
VERIFIED_REVISIONS = frozenset({"dc11669786a5"})
DEFAULT_WORKSPACE = "default"
#: MLflow's internal stage of a deleted version (``STAGE_DELETED_INTERNAL``).
DELETED_STAGE = "Deleted_Internal"
PROMPT_TAG = "mlflow.prompt.is_prompt"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a plain ``sqlite:///<path>`` URI (relative to the working
    directory, as SQLAlchemy reads it); ``None`` for any other URI."""
    if not uri.startswith("sqlite:///") or "?" in uri or "#" in uri:
        return None
    path = uri[len("sqlite:///") :]
    if not path or path == ":memory:":
        return None
    return Path(path)


def read_registry(
    uri: str, model_name: str, alias: str, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, VersionRecord], str | None] | None:
    """Every version of ``model_name`` with its tags, and the version ``alias`` points at,
    read from the SQLite file of ``uri``; ``None`` when this reader cannot answer exactly as
    the MLflow client would (see the module docstring), so the caller asks the client."""
    environ = os.environ if environ is None else environ
    if environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower() not in ("", "false", "0"):
        return None
    path = sqlite_path(uri)
    if path is None or "'" in model_name or not path.is_file():
        return None
    ro = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(ro, uri=True, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("BEGIN")
        try:
            return _read(conn, model_name, alias)
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _read(
    conn: sqlite3.Connection, name: str, alias: str
) -> tuple[dict[str, VersionRecord], str | None] | None:
    revisions = {r for (r,) in conn.execute("SELECT version_num FROM alembic_version")}
    if len(revisions) != 1 or not revisions <= VERIFIED_REVISIONS:
        return None
    elsewhere = conn.execute(
        "SELECT 1 FROM registered_models WHERE workspace != ? LIMIT 1", (DEFAULT_WORKSPACE,)
    ).fetchone()
    if elsewhere is not None:
        return None
    where = (DEFAULT_WORKSPACE, name)
    if (
        conn.execute(
            "SELECT 1 FROM registered_models WHERE workspace = ? AND name = ?", where
        ).fetchone()
        is None
    ):
        return None  # the client's "not found" error
    prompt = conn.execute(
        "SELECT 1 FROM model_version_tags WHERE workspace = ? AND name = ? AND key = ? "
        "AND value = 'true' LIMIT 1",
        (*where, PROMPT_TAG),
    ).fetchone()
    if prompt is not None:
        return None
    tags: dict[int, dict[str, str]] = {}
    for version, key, value in conn.execute(
        "SELECT version, key, value FROM model_version_tags WHERE workspace = ? AND name = ?",
        where,
    ):
        tags.setdefault(version, {})[key] = value
    versions: dict[str, VersionRecord] = {}
    for version, created, run_id, source in conn.execute(
        "SELECT version, creation_time, run_id, source FROM model_versions "
        "WHERE workspace = ? AND name = ? AND current_stage != ?",
        (*where, DELETED_STAGE),
    ):
        versions[str(version)] = VersionRecord(
            version=str(version),
            tags=tags.get(version, {}),
            creation_timestamp=int(created or 0),
            run_id=run_id or None,
            source=source or "",
        )
    row = conn.execute(
        "SELECT version FROM registered_model_aliases "
        "WHERE workspace = ? AND name = ? AND alias = ?",
        (*where, alias),
    ).fetchone()
    return versions, None if row is None else str(row[0])
