"""Deletion requests: schema, validation, and deterministic forget-set extraction.

A request is YAML::

    request_id: req-2026-0001        # unique; names the MLflow run
    reason: "GDPR Art. 17 erasure"
    forget:                          # exactly one of:
      sample_ids: [digits-0001, ...] #   explicit training-sample ids
      classes: [3]                   #   whole classes (``class: 3`` also accepted)
      fraction: 0.1                  #   a seeded random fraction of the training split
      groups: [macbeth]              #   text corpora: every training document of a group (a play)
      seed: 0

Extraction writes id manifests only (``forget_ids.parquet``, ``retain_ids.parquet``,
``request.json``), never copies of the forgotten rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline_lib.io import atomic_path

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORGET_KINDS = ("sample_ids", "classes", "fraction", "groups")
#: A request file larger than this is refused before it is read (a list of ids fits easily).
MAX_REQUEST_BYTES = 1_000_000
#: The longest ``reason`` accepted (it is stored with the request, in MLflow and the ledger).
MAX_REASON_CHARS = 2_000


class RequestError(ValueError):
    """A deletion request is malformed or does not fit the data; the message says which part."""


class LabelledSplits(Protocol):
    """What extraction reads of a prepared labelled dataset
    (:class:`pipeline_lib.data.images.Prepared`): ids, labels and the ids of a split.
    A protocol rather than an import, so requests stay shared by both modalities and the
    text data sources do not import the image ones."""

    ids: np.ndarray  # (N,) str
    y: np.ndarray  # (N,) int

    def split_ids(self, split: str) -> np.ndarray: ...


@dataclass(frozen=True)
class DeletionRequest:
    request_id: str
    reason: str
    kind: Literal["sample_ids", "classes", "fraction", "groups"]
    sample_ids: tuple[str, ...] = ()
    classes: tuple[int, ...] = ()
    fraction: float | None = None
    seed: int = 0
    #: Text corpora (pipeline_lib.data.text): document groups, e.g. plays.
    groups: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_ids"] = list(self.sample_ids)
        d["classes"] = list(self.classes)
        # Only present when used, so the digests of earlier requests do not change.
        if self.groups:
            d["groups"] = list(self.groups)
        else:
            d.pop("groups")
        return d

    @property
    def digest(self) -> str:
        """sha256 of the canonical request (what was asked, independent of YAML layout)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def parse_request(raw: Any, source: str = "request") -> DeletionRequest:
    """Check the schema of a loaded YAML mapping and build a :class:`DeletionRequest`."""
    if not isinstance(raw, Mapping):
        raise RequestError(f"{source}: a request must be a mapping with request_id, reason, forget")
    allowed = {"request_id", "reason", "forget"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RequestError(
            f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(allowed))}"
        )
    rid = raw.get("request_id")
    if not isinstance(rid, str) or not REQUEST_ID_RE.fullmatch(rid):
        raise RequestError(
            f"{source}: request_id must be a string of letters, digits, '.', '_' or '-' "
            f"(max 128), got {rid!r}"
        )
    reason = raw.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise RequestError(f"{source}: reason must be a non-empty string")
    if len(reason) > MAX_REASON_CHARS:
        raise RequestError(
            f"{source}: reason is {len(reason)} characters long; the limit is {MAX_REASON_CHARS}"
        )
    forget = raw.get("forget")
    if not isinstance(forget, Mapping):
        raise RequestError(
            f"{source}: forget must be a mapping with one of {', '.join(FORGET_KINDS)}"
        )
    forget = dict(forget)
    if "group" in forget:
        if "groups" in forget:
            raise RequestError(f"{source}: give forget.group or forget.groups, not both")
        forget["groups"] = [forget.pop("group")]
    if "class" in forget:
        if "classes" in forget:
            raise RequestError(f"{source}: give forget.class or forget.classes, not both")
        forget["classes"] = [forget.pop("class")]
    unknown = sorted(set(forget) - set(FORGET_KINDS) - {"seed"})
    if unknown:
        raise RequestError(
            f"{source}: unknown key forget.{unknown[0]}; valid: sample_ids, classes (or class), fraction, groups (or group), seed"
        )
    kinds = [k for k in FORGET_KINDS if k in forget]
    if len(kinds) != 1:
        raise RequestError(
            f"{source}: forget needs exactly one of sample_ids, classes, fraction, groups (got {kinds or 'none'})"
        )
    kind = kinds[0]
    seed = forget.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RequestError(f"{source}: forget.seed must be a non-negative integer, got {seed!r}")
    if kind == "sample_ids":
        ids = forget["sample_ids"]
        if not isinstance(ids, list) or not all(
            isinstance(i, str | int) and not isinstance(i, bool) for i in ids
        ):
            raise RequestError(f"{source}: forget.sample_ids must be a list of ids")
        ids = [str(i) for i in ids]
        if not ids:
            raise RequestError(
                f"{source}: forget.sample_ids is empty: the forget set would be empty"
            )
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dupes:
            raise RequestError(f"{source}: forget.sample_ids lists {dupes[0]!r} more than once")
        return DeletionRequest(rid, reason, "sample_ids", sample_ids=tuple(ids), seed=seed)
    if kind == "classes":
        classes = forget["classes"]
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)
        ):
            raise RequestError(
                f"{source}: forget.classes must be a non-empty list of class indices"
            )
        if len(set(classes)) != len(classes):
            raise RequestError(f"{source}: forget.classes repeats a class")
        return DeletionRequest(rid, reason, "classes", classes=tuple(sorted(classes)), seed=seed)
    if kind == "groups":
        groups = forget["groups"]
        if (
            not isinstance(groups, list)
            or not groups
            or not all(isinstance(g, str) and g for g in groups)
        ):
            raise RequestError(f"{source}: forget.groups must be a non-empty list of group names")
        if len(set(groups)) != len(groups):
            raise RequestError(f"{source}: forget.groups repeats a group")
        return DeletionRequest(rid, reason, "groups", groups=tuple(sorted(groups)), seed=seed)
    fraction = forget["fraction"]
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not 0.0 < fraction < 1.0
    ):
        raise RequestError(
            f"{source}: forget.fraction must be a number in (0, 1), got {fraction!r}"
        )
    return DeletionRequest(rid, reason, "fraction", fraction=float(fraction), seed=seed)


def request_document(request: DeletionRequest) -> dict[str, Any]:
    """The request in its file schema (``request_id``, ``reason``, ``forget``): what
    :func:`parse_request` reads back into the same request (same digest)."""
    kind = request.kind
    value: Any = {
        "sample_ids": list(request.sample_ids),
        "classes": list(request.classes),
        "groups": list(request.groups),
        "fraction": request.fraction,
    }[kind]
    return {
        "request_id": request.request_id,
        "reason": request.reason,
        "forget": {kind: value, "seed": request.seed},
    }


def request_from_dict(content: Mapping[str, Any]) -> DeletionRequest:
    """A request from its canonical dict (:meth:`DeletionRequest.to_dict`, as the ledger
    stores it)."""
    req = DeletionRequest(
        request_id=content["request_id"],
        reason=content["reason"],
        kind=content["kind"],
        sample_ids=tuple(content.get("sample_ids", ())),
        classes=tuple(content.get("classes", ())),
        fraction=content.get("fraction"),
        seed=content.get("seed", 0),
        groups=tuple(content.get("groups", ())),
    )
    return parse_request(request_document(req), f"request {req.request_id}")


def load_request(path: str | Path) -> DeletionRequest:
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"request file not found: {path}")
    size = path.stat().st_size
    if size > MAX_REQUEST_BYTES:
        raise RequestError(
            f"{path}: request file is {size:,} bytes; the limit is {MAX_REQUEST_BYTES:,} bytes"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); a request is YAML text"
        ) from None
    if "\x00" in text:
        at = text.index("\x00")
        raise RequestError(f"{path}: not a text file (NUL byte at offset {at}); a request is YAML")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RequestError(f"{path}: not valid YAML: {exc}") from exc
    return parse_request(raw, str(path))


def check_unique_ids(requests: Iterable[tuple[str, DeletionRequest]]) -> None:
    """Reject two requests (given as ``(source, request)``) that share a request_id."""
    seen: dict[str, str] = {}
    for source, req in requests:
        if req.request_id in seen:
            raise RequestError(
                f"duplicate request_id {req.request_id!r}: in {seen[req.request_id]} and {source}"
            )
        seen[req.request_id] = source


def _preview(items: list[str], n: int = 5) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(str(i)) for i in items[:n]) + more


def extract_forget_set(
    request: DeletionRequest, data: LabelledSplits
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve a request against prepared data into sorted (forget_ids, retain_ids).

    Deterministic: the result depends only on the request and the set of training ids.
    Raises :class:`RequestError` for unknown ids, test-split ids, unknown classes, and forget
    sets that are empty or the whole training split.
    """
    train_ids = np.sort(data.split_ids("train"))
    src = f"request {request.request_id}"
    if request.kind == "sample_ids":
        asked = np.array(request.sample_ids, dtype=str)
        test_ids = set(data.split_ids("test"))
        in_test = [s for s in asked if s in test_ids]
        if in_test:
            raise RequestError(
                f"{src}: {len(in_test)} id(s) belong to the test split, which no model trained on: "
                f"{_preview(in_test)}"
            )
        known = set(train_ids)
        unknown = [s for s in asked if s not in known]
        if unknown:
            raise RequestError(f"{src}: {len(unknown)} unknown sample id(s): {_preview(unknown)}")
        forget = np.sort(asked)
    elif request.kind == "classes":
        labels = dict(zip(data.ids, data.y, strict=True))
        train_labels = np.array([labels[s] for s in train_ids])
        present = set(np.unique(train_labels).tolist())
        missing = [c for c in request.classes if c not in present]
        if missing:
            raise RequestError(
                f"{src}: class(es) {missing} have no training samples; classes present: {sorted(present)}"
            )
        forget = train_ids[np.isin(train_labels, list(request.classes))]
    elif request.kind == "groups":
        raise RequestError(
            f"{src}: forget.groups applies to text corpora (documents grouped by play); "
            "for images use sample_ids, classes or fraction"
        )
    else:
        assert request.fraction is not None
        n = int(round(request.fraction * len(train_ids)))
        rng = np.random.default_rng(request.seed)
        forget = np.sort(train_ids[rng.permutation(len(train_ids))[:n]])
    if len(forget) == 0:
        raise RequestError(
            f"{src}: the forget set is empty (fraction too small for {len(train_ids)} samples?)"
        )
    if len(forget) >= len(train_ids):
        raise RequestError(
            f"{src}: the forget set is the whole training split; nothing would be retained"
        )
    retain = np.setdiff1d(train_ids, forget, assume_unique=True)
    return forget, retain


def write_manifests(
    out_dir: str | Path,
    request: DeletionRequest,
    forget_ids: np.ndarray,
    retain_ids: np.ndarray,
    data_meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the id manifests and a ``request.json`` summary atomically; return the summary."""
    summary = {
        "request": request.to_dict(),
        "request_digest": request.digest,
        "n_forget": int(len(forget_ids)),
        "n_retain": int(len(retain_ids)),
        "data_content_hash": data_meta["content_hash"],
        "dataset": data_meta["dataset"],
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name, ids in (("forget_ids", forget_ids), ("retain_ids", retain_ids)):
            pq.write_table(
                pa.table({"sample_id": pa.array(ids, pa.string())}), tmp / f"{name}.parquet"
            )
        (tmp / "request.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


@dataclass(frozen=True)
class Manifests:
    forget_ids: np.ndarray
    retain_ids: np.ndarray
    summary: dict[str, Any]


def load_manifests(path: str | Path) -> Manifests:
    path = Path(path)
    for name in ("forget_ids.parquet", "retain_ids.parquet", "request.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: missing {name}; run the extract stage first")
    read = lambda n: np.array(pq.read_table(path / n).column("sample_id").to_pylist(), dtype=str)  # noqa: E731
    return Manifests(
        read("forget_ids.parquet"),
        read("retain_ids.parquet"),
        json.loads((path / "request.json").read_text()),
    )
