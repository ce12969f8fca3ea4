"""The request ledger: every deletion request, its state and its history, in a real database.

The ledger lives in the database the stack already runs: the MLflow tracking database when
the MLflow URI is a database URL (``sqlite:///mlflow.db``, ``postgresql://...``), or another
SQLAlchemy URL given explicitly. Its tables are prefixed ``unlearnflow_`` so they never
collide with MLflow's (MLflow only checks that its own tables exist).

Tables:

- ``unlearnflow_requests``: one row per request; ``seq`` (autoincrement) is the arrival
  order, ``request_id`` is unique; the canonical request dict is kept as JSON text with its
  digest; ``owner``/``claimed_at`` say which process is processing it.
- ``unlearnflow_request_events``: every state change (from, to, time, reason), append-only.
- ``unlearnflow_models``: one row per model name, locked (``SELECT ... FOR UPDATE``) by a
  claimer on PostgreSQL so that claims of one model are serialised.
- ``unlearnflow_forgotten_ids``: an index of the tombstone set, one row per (sample id,
  request): when it was tombstoned and its row in the append-only tombstone file
  (``tombstone_index``), so ``unlearn lineage sample`` is one indexed query.
- ``unlearnflow_purges``: every retention purge: what was deleted, when and why.

Requests of one model are processed strictly one at a time in arrival order, because each
starts from the model's current production version. :meth:`Ledger.claim_next` enforces
this in one transaction (``BEGIN IMMEDIATE`` on SQLite, a row lock on the model's row on
PostgreSQL), and a partial unique index (at most one ``processing`` row per model) makes
the database itself refuse a second concurrent claim whatever the code does.

State rules come from :mod:`pipeline_lib.service.lifecycle`; this module only stores them.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError

from pipeline_lib.io import pid_alive
from pipeline_lib.service.lifecycle import (
    InvalidTransition,
    Status,
    Transition,
    check_status,
    check_transition,
    utc_now_iso,
)

if TYPE_CHECKING:
    from pipeline_lib.data.requests import DeletionRequest

log = logging.getLogger(__name__)

#: SQLAlchemy dialects the ledger supports (those whose partial indexes it relies on).
DIALECTS = ("sqlite", "postgresql")

#: Columns that :meth:`Ledger.transition` may set beside the status.
TRANSITION_FIELDS = frozenset(
    {"error", "mlflow_run_id", "parent_version", "produced_version", "batch_id"}
)

#: Execution option that makes a SQLite transaction a plain (deferred) BEGIN.
_READ_ONLY = "unlearnflow_read_only"

metadata = sa.MetaData()

requests_table = sa.Table(
    "unlearnflow_requests",
    metadata,
    # The arrival order. SQLite only autoincrements an INTEGER PRIMARY KEY, so the surrogate
    # is the primary key and request_id is a unique natural key; sqlite_autoincrement keeps
    # numbers from being reused after a delete, so seq is monotonic on both backends.
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(128), nullable=False, unique=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("content", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("submitted_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.Column("owner", sa.String(300)),
    sa.Column("claimed_at", sa.String(40)),
    sa.Column("error", sa.Text),
    sa.Column("mlflow_run_id", sa.String(64)),
    sa.Column("parent_version", sa.String(32)),
    sa.Column("produced_version", sa.String(32)),
    sa.Column("batch_id", sa.String(128)),
    sqlite_autoincrement=True,
)
sa.Index("unlearnflow_requests_queue", requests_table.c.model_name, requests_table.c.status)
sa.Index(
    "unlearnflow_one_processing_per_model",
    requests_table.c.model_name,
    unique=True,
    sqlite_where=requests_table.c.status == "processing",
    postgresql_where=requests_table.c.status == "processing",
)

events_table = sa.Table(
    "unlearnflow_request_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "request_id",
        sa.String(128),
        sa.ForeignKey("unlearnflow_requests.request_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("from_status", sa.String(32)),
    sa.Column("to_status", sa.String(32), nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)

models_table = sa.Table(
    "unlearnflow_models",
    metadata,
    sa.Column("model_name", sa.String(256), primary_key=True),
    sa.Column("created_at", sa.String(40), nullable=False),
)


forgotten_table = sa.Table(
    "unlearnflow_forgotten_ids",
    metadata,
    sa.Column("sample_id", sa.String(256), primary_key=True),
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("at", sa.String(40), nullable=False),
    # position of the id's (first) row in the append-only tombstone file: an exact version
    # whose tag tombstones_count is N was trained without exactly the ids with index < N
    sa.Column("tombstone_index", sa.Integer, nullable=False),
)
sa.Index(
    "unlearnflow_forgotten_ids_model_sample",
    forgotten_table.c.model_name,
    forgotten_table.c.sample_id,
)

purges_table = sa.Table(
    "unlearnflow_purges",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)


@dataclass(frozen=True)
class Forgotten:
    """One forgotten id of the index: which request tombstoned it, when, and where."""

    sample_id: str
    request_id: str
    model_name: str
    at: str
    tombstone_index: int


@dataclass(frozen=True)
class Purge:
    """One deletion made by a retention purge."""

    model_name: str
    at: str
    kind: str
    target: str
    reason: str


class LedgerConflict(ValueError):
    """A request id already in the ledger with different content (or for another model)."""


class LedgerError(ValueError):
    """A ledger operation was refused: unknown request, unsupported database, bad field."""


@dataclass(frozen=True)
class LedgerRow:
    """One request as the ledger holds it (a snapshot; the ledger does not update it)."""

    seq: int
    request_id: str
    model_name: str
    digest: str
    content: dict[str, Any]
    status: Status
    submitted_at: str
    updated_at: str
    owner: str | None
    claimed_at: str | None
    error: str | None
    mlflow_run_id: str | None
    parent_version: str | None
    produced_version: str | None
    batch_id: str | None


def _row(r: sa.Row[Any]) -> LedgerRow:
    m = dict(r._mapping)
    m["content"] = json.loads(m["content"])
    m["status"] = check_status(m["status"])
    return LedgerRow(**m)


def ledger_url(mlflow_uri: str, override: str | None = None) -> str:
    """The database URL of the ledger.

    ``override`` wins when given. Otherwise the MLflow tracking URI is used when it is a
    database URL (SQLite or PostgreSQL), so the ledger sits beside MLflow's tables. An
    ``http(s)://`` tracking server (or a file store) hides its database from clients, so it
    cannot be used: a ``ValueError`` says to set the ledger URL.
    """
    if not override and mlflow_uri.split("://", 1)[0].lower() in ("http", "https"):
        raise ValueError(
            f"MLflow tracking URI {mlflow_uri!r} is a tracking server, whose database clients "
            "cannot reach: set the ledger URL to the database itself (a SQLAlchemy URL, e.g. "
            "the server's --backend-store-uri postgresql://user@host/db)"
        )
    url = override or mlflow_uri
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(
            f"MLflow tracking URI {mlflow_uri!r} is not a database URL, so the request ledger "
            "cannot share it; set the ledger URL to a SQLAlchemy database URL "
            "(e.g. sqlite:///ledger.db or postgresql://user@host/db)"
        ) from exc
    backend = parsed.get_backend_name()
    if backend not in DIALECTS:
        where = "ledger URL" if override else f"MLflow tracking URI {mlflow_uri!r}"
        raise ValueError(
            f"the {where} uses {backend!r}; the request ledger needs a database URL "
            f"({' or '.join(DIALECTS)}): set the ledger URL explicitly "
            "(e.g. sqlite:///ledger.db or postgresql://user@host/db)"
        )
    return url


def default_owner() -> str:
    """``host:pid`` of this process: who holds a claimed request."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _make_engine(url: str) -> Engine:
    backend = make_url(url).get_backend_name()
    if backend not in DIALECTS:
        raise LedgerError(
            f"ledger database {backend!r} is not supported; use {' or '.join(DIALECTS)}"
        )
    if backend != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    # pysqlite opens transactions lazily (at the first write), so two processes can both read
    # "nothing is processing" and then both write. Take the database write lock when the
    # transaction begins instead (BEGIN IMMEDIATE), waiting up to `timeout` seconds for it.
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        # Read-only transactions need no write lock (and must not hold up MLflow's writers).
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


class Ledger:
    """The request ledger in the database at ``url`` (tables created if absent).

    Every method is one transaction and may be called from any number of processes at once.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self._create_tables()

    def _create_tables(self) -> None:
        # Several processes starting on a fresh PostgreSQL database can race on CREATE TABLE
        # (the loser gets "already exists"); checking again after the winner committed is
        # enough. SQLite serialises the creation under BEGIN IMMEDIATE.
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    metadata.create_all(conn, checkfirst=True)
                return
            except (ProgrammingError, IntegrityError):
                if attempt == 2:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def __repr__(self) -> str:
        return f"Ledger({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        """Close the connection pool (the ledger can still be used; it reconnects)."""
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction (on SQLite it holds the write lock from its start)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read-only transaction (a plain deferred BEGIN on SQLite)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield conn

    # ------------------------------------------------------------------ writing

    def _event(
        self, conn: Connection, request_id: str, frm: str | None, to: str, reason: str, at: str
    ) -> None:
        conn.execute(
            events_table.insert().values(
                request_id=request_id, from_status=frm, to_status=to, at=at, reason=reason
            )
        )

    def _ensure_model(self, conn: Connection, model_name: str) -> None:
        exists = conn.execute(
            sa.select(models_table.c.model_name).where(models_table.c.model_name == model_name)
        ).first()
        if exists is None:
            try:
                with conn.begin_nested():
                    conn.execute(
                        models_table.insert().values(
                            model_name=model_name, created_at=utc_now_iso()
                        )
                    )
            except IntegrityError:
                pass  # another submitter created it first

    def submit(self, request: DeletionRequest, model_name: str) -> tuple[Status, bool]:
        """Record ``request`` for ``model_name`` as ``pending``; return ``(status, created)``.

        Idempotent: the same request id with the same digest returns its current status and
        ``created=False``. The same id with other content, or for another model, raises
        :class:`LedgerConflict` naming the id and both digests.
        """
        for attempt in range(2):
            try:
                return self._submit_once(request, model_name)
            except IntegrityError:
                # PostgreSQL: another process inserted the same id between our read and our
                # insert. Read again: the second pass sees its row.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _submit_once(self, request: DeletionRequest, model_name: str) -> tuple[Status, bool]:
        rid, digest = request.request_id, request.digest
        with self._tx() as conn:
            existing = conn.execute(
                sa.select(
                    requests_table.c.digest, requests_table.c.status, requests_table.c.model_name
                ).where(requests_table.c.request_id == rid)
            ).first()
            if existing is not None:
                if existing.digest != digest:
                    raise LedgerConflict(
                        f"request id {rid!r} is already in the ledger with other content "
                        f"(digest {existing.digest[:12]} there, {digest[:12]} submitted); "
                        "give the new request its own id"
                    )
                if existing.model_name != model_name:
                    raise LedgerConflict(
                        f"request id {rid!r} (digest {digest[:12]}) is already in the ledger "
                        f"for model {existing.model_name!r}, not {model_name!r}"
                    )
                return check_status(existing.status), False
            self._ensure_model(conn, model_name)
            now = utc_now_iso()
            conn.execute(
                requests_table.insert().values(
                    request_id=rid,
                    model_name=model_name,
                    digest=digest,
                    content=json.dumps(request.to_dict(), sort_keys=True),
                    status="pending",
                    submitted_at=now,
                    updated_at=now,
                )
            )
            self._event(conn, rid, None, "pending", "submitted", now)
        log.info("request %s submitted for %s (pending)", rid, model_name)
        return "pending", True

    def claim_next(self, model_name: str, owner: str | None = None) -> LedgerRow | None:
        """Move the oldest ``pending`` request of ``model_name`` to ``processing`` and return
        it; ``None`` when nothing is pending or a request of that model is being processed.

        ``owner`` (default ``host:pid``) and the time are recorded on the row, for
        :meth:`recover_stale`. Safe with many processes: on SQLite the transaction holds the
        database write lock from its start; on PostgreSQL it locks the model's row first; in
        both, the update is conditional on ``status='pending'`` and its row count is checked.
        """
        owner = owner or default_owner()
        r = requests_table.c
        with self._tx() as conn:
            lock = conn.execute(
                sa.select(models_table.c.model_name)
                .where(models_table.c.model_name == model_name)
                .with_for_update()
            ).first()
            if lock is None:
                return None  # nothing was ever submitted for this model
            busy = conn.execute(
                sa.select(r.request_id)
                .where(r.model_name == model_name, r.status == "processing")
                .limit(1)
            ).first()
            if busy is not None:
                log.debug("%s: %s is processing; not claiming", model_name, busy.request_id)
                return None
            candidate = conn.execute(
                sa.select(r.request_id)
                .where(r.model_name == model_name, r.status == "pending")
                .order_by(r.seq)
                .limit(1)
            ).first()
            if candidate is None:
                return None
            now = utc_now_iso()
            updated = conn.execute(
                requests_table.update()
                .where(r.request_id == candidate.request_id, r.status == "pending")
                .values(status="processing", owner=owner, claimed_at=now, updated_at=now)
            )
            if updated.rowcount != 1:
                # Cannot happen under the lock; if it does, claiming nothing is the safe answer.
                log.warning("claim of %s lost a race; nothing claimed", candidate.request_id)
                return None
            self._event(
                conn, candidate.request_id, "pending", "processing", f"claimed by {owner}", now
            )
            row = conn.execute(
                sa.select(requests_table).where(r.request_id == candidate.request_id)
            ).one()
        log.info("request %s claimed by %s", row.request_id, owner)
        return _row(row)

    def transition(self, request_id: str, to: str, reason: str, **fields: Any) -> LedgerRow:
        """Move ``request_id`` to state ``to``, recording ``reason``; return the new row.

        The transition is checked against :mod:`pipeline_lib.service.lifecycle` and applied
        only if the row still has the state it was read with. ``fields`` may set ``error``,
        ``mlflow_run_id``, ``parent_version``, ``produced_version`` and ``batch_id``.
        Entering ``processing`` is refused here: only :meth:`claim_next` may do that, since
        it alone enforces one request per model at a time.
        """
        unknown = sorted(set(fields) - TRANSITION_FIELDS)
        if unknown:
            raise LedgerError(
                f"unknown ledger field(s) {', '.join(unknown)}; valid: {', '.join(sorted(TRANSITION_FIELDS))}"
            )
        target = check_status(to)
        if target == "processing":
            raise InvalidTransition(
                f"request {request_id}: use claim_next() to start processing (it enforces "
                "one request per model at a time)"
            )
        r = requests_table.c
        with self._tx() as conn:
            current = conn.execute(
                sa.select(r.status).where(r.request_id == request_id).with_for_update()
            ).first()
            if current is None:
                raise LedgerError(f"request {request_id!r} is not in the ledger")
            check_transition(current.status, target, request_id)
            now = utc_now_iso()
            updated = conn.execute(
                requests_table.update()
                .where(r.request_id == request_id, r.status == current.status)
                .values(status=target, updated_at=now, **fields)
            )
            if updated.rowcount != 1:
                raise InvalidTransition(
                    f"request {request_id}: its state changed from {current.status!r} "
                    "while the transition was being written; read it again"
                )
            self._event(conn, request_id, current.status, target, reason, now)
            row = conn.execute(sa.select(requests_table).where(r.request_id == request_id)).one()
        log.info("request %s: %s -> %s (%s)", request_id, current.status, target, reason)
        return _row(row)

    def recover_stale(
        self, model_name: str, is_alive: Callable[[int], bool] = pid_alive
    ) -> builtins.list[LedgerRow]:
        """Fail the requests of ``model_name`` left ``processing`` by a dead process.

        Only owners on this host can be judged (``is_alive(pid)`` is asked about their pid);
        requests held by another host, or by an owner string that is not ``host:pid``, are
        left alone. Each recovered request goes to ``failed`` with reason "owner process
        died" (a retry is then an explicit ``failed -> pending``). Returns the failed rows.
        """
        host = socket.gethostname()
        recovered: builtins.list[LedgerRow] = []
        for row in self.list(status="processing", model_name=model_name):
            owner_host, _, pid_text = (row.owner or "").rpartition(":")
            if owner_host != host or not pid_text.isdigit():
                continue
            if is_alive(int(pid_text)):
                continue
            try:
                recovered.append(
                    self.transition(
                        row.request_id,
                        "failed",
                        "owner process died",
                        error=f"owner {row.owner} died while processing",
                    )
                )
            except InvalidTransition:
                continue  # finished (or recovered by someone else) meanwhile
        return recovered

    # ------------------------------------------------------------------ reading

    def get(self, request_id: str) -> LedgerRow | None:
        """The request ``request_id``, or ``None`` if the ledger does not hold it."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(requests_table).where(requests_table.c.request_id == request_id)
            ).first()
        return None if row is None else _row(row)

    def list(
        self, status: str | None = None, model_name: str | None = None
    ) -> builtins.list[LedgerRow]:
        """Requests in arrival order, optionally only those in ``status`` / of ``model_name``."""
        query = sa.select(requests_table).order_by(requests_table.c.seq)
        if status is not None:
            query = query.where(requests_table.c.status == check_status(status))
        if model_name is not None:
            query = query.where(requests_table.c.model_name == model_name)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [_row(r) for r in rows]

    def events(self, request_id: str) -> builtins.list[Transition]:
        """Every recorded state change of ``request_id``, oldest first (empty if unknown)."""
        e = events_table.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(e.request_id, e.from_status, e.to_status, e.at, e.reason)
                .where(e.request_id == request_id)
                .order_by(e.id)
            ).all()
        return [
            Transition(
                request_id=row.request_id,
                from_status=None if row.from_status is None else check_status(row.from_status),
                to_status=check_status(row.to_status),
                at=row.at,
                reason=row.reason,
            )
            for row in rows
        ]

    # ------------------------------------------------------------- forgotten ids, purges

    def record_forgotten(
        self,
        model_name: str,
        request_id: str,
        positions: dict[str, int],
        at: str,
    ) -> int:
        """Index the ids ``request_id`` tombstoned (``{sample id: row in the tombstone
        file}``) at ``at`` (ISO time). Idempotent (a retried request adds nothing).
        Returns the number of new rows."""
        f = forgotten_table.c
        with self._tx() as conn:
            known = {
                r.sample_id
                for r in conn.execute(
                    sa.select(f.sample_id).where(
                        f.request_id == request_id, f.model_name == model_name
                    )
                )
            }
            rows = [
                {
                    "sample_id": sid,
                    "request_id": request_id,
                    "model_name": model_name,
                    "at": at,
                    "tombstone_index": int(pos),
                }
                for sid, pos in positions.items()
                if sid not in known
            ]
            for i in range(0, len(rows), 500):
                conn.execute(forgotten_table.insert(), rows[i : i + 500])
        return len(rows)

    def forgotten(
        self, model_name: str, sample_id: str | None = None, request_id: str | None = None
    ) -> builtins.list[Forgotten]:
        """The forgotten-id index of ``model_name``: one sample's rows when ``sample_id`` is
        given (an indexed lookup), one request's when ``request_id`` is; ordered by time."""
        f = forgotten_table.c
        query = sa.select(forgotten_table).where(f.model_name == model_name)
        if sample_id is not None:
            query = query.where(f.sample_id == sample_id)
        if request_id is not None:
            query = query.where(f.request_id == request_id)
        with self._read() as conn:
            rows = conn.execute(query.order_by(f.at, f.tombstone_index)).all()
        return [Forgotten(**dict(r._mapping)) for r in rows]

    def record_purge(self, model_name: str, kind: str, target: str, reason: str) -> Purge:
        """Record one deletion of a retention purge (append-only)."""
        purge = Purge(model_name, utc_now_iso(), kind, target, reason)
        with self._tx() as conn:
            conn.execute(purges_table.insert().values(**purge.__dict__))
        return purge

    def purges(self, model_name: str) -> builtins.list[Purge]:
        """Every recorded purge deletion of ``model_name``, oldest first."""
        p = purges_table.c
        with self._read() as conn:
            rows = conn.execute(
                sa.select(p.model_name, p.at, p.kind, p.target, p.reason)
                .where(p.model_name == model_name)
                .order_by(p.id)
            ).all()
        return [Purge(**dict(r._mapping)) for r in rows]
