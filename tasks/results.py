"""Prefect result records that are JSON only, and refused when they are not.

A Prefect result record names the serializer that decodes its payload, and Prefect uses
whatever it names: a record in ``.prefect-results`` edited to name ``pickle`` would run code on
the next cache hit, and Prefect's own ``json`` serializer imports and builds any class a record
names (``__class__``, ``object_decoder``). So every task whose results are persisted and read
back as a cache (:func:`persisted`) uses:

- :class:`StrictJSONSerializer` (type ``unlearnflow-json``): the standard library's ``json``
  with no object hooks. Results are plain data (dicts of paths, digests and numbers); a value
  JSON cannot hold fails the write instead of being stored some other way.
- its cache policy's ``key_storage``, a :class:`JSONRecordStorage`: the cache records (the
  metadata naming the serializer and the result file) live in ``cache-keys/`` under Prefect's
  local result storage, and one is read only when it is JSON, names ``unlearnflow-json`` (or
  Prefect's ``json``, then read with the strict decoder) and its result file is JSON too.
  Anything else (``pickle``, ``compressed/pickle``, a custom class, an unparsable or missing
  file) is refused before Prefect decodes it: the record is removed, Prefect counts a cache
  miss, the task runs again and writes a new record.

``flows/cli.py`` also sets ``PREFECT_RESULTS_DEFAULT_SERIALIZER=json``, so what Prefect writes
for flows and failed tasks outside these options (their exceptions) is JSON, not a pickle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.logging import get_logger
from prefect.serializers import Serializer
from pydantic import BaseModel, Field

log = get_logger("unlearnflow.results")

STRICT_TYPE = "unlearnflow-json"
#: Serializer types whose records are read (``json`` with the strict decoder, never Prefect's).
READABLE_TYPES = (STRICT_TYPE, "json")


class RefusedRecord(ValueError):
    """A result record that is not JSON or names a serializer other than JSON."""


def _plain(obj: Any) -> Any:
    """JSON form of the few non-JSON values results may hold; anything else is refused."""
    import numpy as np

    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, BaseException):  # a failed task's exception: its type and message only
        return {"error": f"{type(obj).__module__}.{type(obj).__qualname__}", "message": str(obj)}
    raise TypeError(f"a result of type {type(obj).__name__} is not plain JSON data")


class StrictJSONSerializer(Serializer):
    """The standard library's JSON, no object hooks: decoding builds dicts, lists, strings and
    numbers only."""

    type: str = Field(default=STRICT_TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, default=_plain).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob.decode())


def check_record(content: bytes, where: str = "result record") -> bytes:
    """``content`` if it is a JSON result record (or the metadata of one) naming a readable
    serializer, with that serializer replaced by the strict one (so Prefect never uses a decoder
    or library the record names); else :class:`RefusedRecord`."""
    try:
        record = json.loads(content)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RefusedRecord(f"{where}: not a JSON result record; refused") from exc
    if not isinstance(record, dict):
        raise RefusedRecord(f"{where}: not a JSON result record; refused")
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else record
    serializer = meta.get("serializer")
    kind = serializer.get("type") if isinstance(serializer, dict) else serializer
    if kind not in READABLE_TYPES:
        raise RefusedRecord(f"{where}: names serializer {kind!r}, not JSON; refused")
    meta["serializer"] = {"type": STRICT_TYPE}
    return json.dumps(record).encode()


def _results_base() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path).expanduser().resolve()


class JSONRecordStorage(LocalFileSystem):
    """The cache records' storage: ``cache-keys/`` under the current
    ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` (read when used, so the CLI and tests may set it after
    import). Reads JSON records only (:func:`check_record`) whose result file, under the same
    results directory, is JSON too; a refused record is removed and logged, and Prefect sees a
    cache miss."""

    _block_type_name = "unlearnflow JSON cache records"

    def _resolve_path(self, path: str) -> Path:
        if self.basepath:
            return super()._resolve_path(path)
        base = _results_base() / "cache-keys"
        resolved = (base / Path(path).expanduser()).resolve()
        if base not in resolved.parents and resolved != base:
            raise ValueError(f"cache record {resolved} is outside {base}")
        return resolved

    def _checked(self, path: str, content: bytes) -> bytes:
        where = str(self._resolve_path(path))
        try:
            checked = check_record(content, where)
            meta = json.loads(checked)
            stored = meta.get("storage_key")
            if stored is not None:  # the result lives in its own file: JSON as well
                result = Path(stored).resolve()
                if _results_base() not in result.parents:
                    raise RefusedRecord(f"{where}: its result {result} is outside the results")
                try:
                    json.loads(result.read_bytes())
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    raise RefusedRecord(
                        f"{where}: its result {result} is missing or not JSON; refused"
                    ) from exc
        except RefusedRecord as exc:
            log.warning("%s; removing it, the task will run again", exc)
            self._resolve_path(path).unlink(missing_ok=True)
            raise
        return checked

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path, await super().aread_path(path))

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # noqa: ARG002
        return self._checked(path, LocalFileSystem.read_path(self, path, _sync=True))


STRICT_JSON = StrictJSONSerializer()
RECORD_STORAGE = JSONRecordStorage()


def keyed(cache_key_fn: Any) -> CachePolicy:
    """A cache policy keyed by ``cache_key_fn`` whose records are read as above. For
    ``task.with_options(cache_policy=keyed(fn))``: passing ``cache_key_fn=`` instead would make
    Prefect build a policy of its own, without this record storage."""
    return CacheKeyFnPolicy(cache_key_fn=cache_key_fn).configure(key_storage=RECORD_STORAGE)


def persisted(policy: CachePolicy) -> dict[str, Any]:
    """Task options of a task whose results are persisted and read back as a cache under
    ``policy``: JSON results, records read only when JSON (see the module docstring)."""
    return dict(
        cache_policy=policy.configure(key_storage=RECORD_STORAGE),
        persist_result=True,
        result_serializer=STRICT_JSON,
    )
