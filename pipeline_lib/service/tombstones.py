"""The tombstone set: every sample id ever forgotten, with the request that forgot it and when.

One cumulative, append-only Parquet table (columns ``sample_id``, ``request_id``,
``forgotten_at``), versioned with DVC by the tasks that write it. Every retain set, oracle
and later training excludes the tombstoned ids, so a sample forgotten by request A never
comes back through request B's retain set or the next exact retrain.

Append-only means existing rows are never changed or removed: a sample id forgotten a second
time (by another request, or by a retried one) keeps its first row. The functions here take
and return ``pyarrow.Table`` values and never mutate their input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline_lib.io import atomic_path

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("forgotten_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class TombstoneError(ValueError):
    """A tombstone file or argument is malformed; the message says which part."""


def empty_tombstones() -> pa.Table:
    """A tombstone table with no rows and the canonical schema."""
    return SCHEMA.empty_table()


def _conform(table: pa.Table, source: str) -> pa.Table:
    """Check the columns of ``table`` and cast it to :data:`SCHEMA` (column order included)."""
    missing = [n for n in SCHEMA.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in SCHEMA.names]
    if missing or extra:
        raise TombstoneError(
            f"{source}: tombstone columns must be {', '.join(SCHEMA.names)}; "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    table = table.select(SCHEMA.names)
    for name in SCHEMA.names:
        if table.column(name).null_count:
            raise TombstoneError(f"{source}: column {name} has null values")
    try:
        return table.cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TombstoneError(f"{source}: tombstone columns have the wrong types: {exc}") from exc


def read_tombstones(path: str | Path) -> pa.Table:
    """Read the tombstone table at ``path``; a missing file is an empty set (no request has
    been processed yet)."""
    path = Path(path)
    if not path.exists():
        return empty_tombstones()
    if not path.is_file():
        raise TombstoneError(f"{path}: expected a Parquet file of tombstones, found a directory")
    return _conform(pq.read_table(path), str(path))


def _as_utc(at: datetime | str) -> datetime:
    """``at`` as an aware UTC datetime. Naive datetimes and ISO strings without an offset are
    refused: a time without a zone cannot be placed in an audit trail."""
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at)
        except ValueError as exc:
            raise TombstoneError(f"forgotten_at: not an ISO-8601 time: {at!r}") from exc
    if not isinstance(at, datetime):
        raise TombstoneError(f"forgotten_at must be a datetime or ISO string, got {at!r}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise TombstoneError(f"forgotten_at must carry a time zone (UTC), got {at.isoformat()}")
    return at.astimezone(UTC)


def append_tombstones(
    table: pa.Table,
    request_id: str,
    sample_ids: Iterable[str],
    at: datetime | str,
) -> pa.Table:
    """Return ``table`` plus one row per id of ``sample_ids`` not already tombstoned.

    Ids already in the table keep their first row (the request that first forgot them), so
    re-appending a request (a retry) is a no-op; duplicates inside ``sample_ids`` count once.
    Existing rows come first, unchanged and in their order; new rows follow in the order given.
    """
    if not request_id:
        raise TombstoneError("request_id must be a non-empty string")
    table = _conform(table, "tombstone table")
    when = _as_utc(at)
    known = set(table.column("sample_id").to_pylist())
    new: list[str] = []
    for sid in sample_ids:
        sid = str(sid)
        if not sid:
            raise TombstoneError(f"request {request_id}: empty sample id")
        if sid not in known:
            known.add(sid)
            new.append(sid)
    log.debug("request %s: %d new tombstone(s)", request_id, len(new))
    if not new:
        return table
    rows = pa.table(
        {
            "sample_id": pa.array(new, pa.string()),
            "request_id": pa.array([request_id] * len(new), pa.string()),
            "forgotten_at": pa.array([when] * len(new), pa.timestamp("us", tz="UTC")),
        },
        schema=SCHEMA,
    )
    return pa.concat_tables([table, rows]).combine_chunks()


def write_tombstones(table: pa.Table, path: str | Path) -> None:
    """Write ``table`` as Parquet at ``path`` atomically (a crash leaves the previous file)."""
    table = _conform(table, "tombstone table")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def tombstoned_ids(table: pa.Table) -> np.ndarray:
    """The tombstoned sample ids, sorted, as a numpy array of ``str``."""
    ids = table.column("sample_id").to_pylist()
    return np.array(sorted(ids), dtype=str) if ids else np.array([], dtype=str)


def exclude(ids: Iterable[str] | np.ndarray, table: pa.Table) -> np.ndarray:
    """The ids of ``ids`` that are not tombstoned, in their given order (numpy ``str``)."""
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=str)
    if arr.size == 0 or table.num_rows == 0:
        return arr
    dead = pc.is_in(pa.array(arr, pa.string()), value_set=table.column("sample_id"))
    return arr[~np.asarray(dead.to_numpy(zero_copy_only=False), dtype=bool)]


def tombstone_digest(table: pa.Table) -> str:
    """sha256 of the sorted tombstoned ids (as a compact JSON list, so no id can run into the
    next): names a tombstone *set*, independent of row order, request ids and times, so
    caches keyed on it (an oracle trained on the data minus the tombstones) are shared by
    equal sets."""
    payload = json.dumps(tombstoned_ids(table).tolist(), separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
