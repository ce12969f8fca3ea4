"""Every input checked before any work: the params (file, ``--set``, environment), the data
source, the request files and the counts a command asks for.

The CLI calls :func:`check_inputs` after parsing the params and before the temporary Prefect
API starts, the ledger is opened or a DVC stage runs, so an input error costs a second, says
in one line which key, file or column is wrong (a :class:`ConfigError`, :class:`DataError`
or :class:`RequestError`: the CLI exits 2) and leaves the workspace as it was (DVC deletes a
stage's outputs before it runs the stage: a bad source found inside the stage would cost the
earlier prepared data).

What is checked beyond the typed sections themselves (:mod:`pipeline_lib.schema`):

- every number is finite (``train.lr=inf``), every seed in ``[0, 2**32)``;
- output directories (``data.out_dir``, ``request.out_dir``, ``evaluate.report_dir``,
  ``tracking.artifacts_dir``, ``attribution.out_dir``, ``stats.out_dir``) stay
  inside the project (``tracking.dvc_root``) unless ``UNLEARN_ALLOW_OUTSIDE_PROJECT=1``;
- ``tracking.mlflow_uri`` has a scheme MLflow can track to, and a SQLite file's directory
  exists; ``train.device: cuda`` needs a CUDA device;
- the data source: the prepared data when it is current for these params (DVC's lock
  records the same data settings), else the source prepared afresh in a temporary folder
  (every check of :func:`pipeline_lib.data.images.prepare_dataset`: schema, types,
  finiteness, labels 0..k-1, unique non-null ids, non-empty splits; nothing is written in
  the project);
- each request against those data (unknown or test-split ids, absent classes, an empty or
  whole forget set) and against the project: its id must not name another request (a
  request file under ``requests/`` or an earlier run directory ``runs/<modality>/<id>``
  with other content, or a directory that is not a request's);
- the model section against the data (the model is built once on its sample shape);
- the number of models a store would hold against the memory it would need.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from pipeline_lib.data.images import DataError
from pipeline_lib.data.requests import (
    DeletionRequest,
    RequestError,
    extract_forget_set,
    load_request,
)
from pipeline_lib.params_file import MAX_PARAMS_BYTES, check_params_file
from pipeline_lib.schema import ConfigError, flatten, to_dict

__all__ = [
    "ALLOW_OUTSIDE_ENV",
    "MAX_PARAMS_BYTES",
    "RUNS_DIR",
    "TRACKING_SCHEMES",
    "check_inputs",
    "check_params",
    "check_params_file",
    "check_model",
    "check_store_size",
    "data_variant_dir",
    "current_prepared",
]

#: Where the pipeline keeps per-request and per-data-variant stage files (tasks.versioning).
RUNS_DIR = "runs"
#: Environment variable that lets output directories lie outside the project.
ALLOW_OUTSIDE_ENV = "UNLEARN_ALLOW_OUTSIDE_PROJECT"
#: Schemes of an MLflow tracking URI (a plain path is a file store).
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")
SEED_LIMIT = 2**32
#: Last parts of the keys that name output directories (``lm.cache_dir``, a download cache
#: that may be shared between projects, is not one).
OUTPUT_DIR_KEYS = ("out_dir", "report_dir", "artifacts_dir")


# --------------------------------------------------------------------------- params


def _is_seed(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_tracking_uri(uri: str, root: Path) -> None:
    where = "tracking.mlflow_uri (or MLFLOW_TRACKING_URI)"
    if "://" not in uri:
        if ":" in uri.split("/", 1)[0]:
            raise ConfigError(
                f"{where}: {uri!r} is not a URI MLflow can track to; use sqlite:///mlflow.db, "
                "postgresql://user@host/db, http(s)://server or a directory path"
            )
        return  # a file store directory
    scheme = uri.split("://", 1)[0].lower()
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ConfigError(
            f"{where}: scheme {scheme!r} of {uri!r} is not one MLflow can track to "
            f"({', '.join(TRACKING_SCHEMES)})"
        )
    if scheme == "sqlite":
        file = uri.split("://", 1)[1].split("?", 1)[0]
        if not file.startswith("/"):
            raise ConfigError(f"{where}: {uri!r}: a SQLite URI is sqlite:///relative/path.db")
        file = file[1:]
        if file and file != ":memory:":
            path = Path(file) if Path(file).is_absolute() else Path.cwd() / file
            if not path.parent.is_dir():
                raise ConfigError(
                    f"{where}: {uri!r}: directory {path.parent} of the SQLite file does not exist"
                )


def check_params(params: Any) -> None:
    """What the typed sections cannot see: finite numbers, seed ranges, output paths inside
    the project, the tracking URI, the device. Raises :class:`ConfigError` naming the key."""
    flat = flatten(to_dict(params))
    for key, value in flat.items():
        values = value if isinstance(value, (list, tuple)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {v}")
            if _is_seed(key) and isinstance(v, int) and not isinstance(v, bool):
                if not 0 <= v < SEED_LIMIT:
                    raise ConfigError(f"{key}: a seed must be in [0, 2**32), got {v}")
    unlearn, train = getattr(params, "unlearn", None), getattr(params, "train", None)
    if getattr(unlearn, "method", None) == "mnemonic_code" and not getattr(
        train, "mnemonic_t_mix", 0.0
    ):
        raise ConfigError(
            "unlearn.method: mnemonic_code reads the class codes of a model trained with them: "
            "set train.mnemonic_t_mix > 0 (paper: 0.1 on MNIST-like data)"
        )
    tracking = getattr(params, "tracking", None)
    if tracking is None:
        return
    root = Path(tracking.dvc_root).resolve()
    if not root.is_dir():
        raise ConfigError(f"tracking.dvc_root: {tracking.dvc_root!r} is not a directory")
    if not (root / ".dvc").is_dir():
        raise ConfigError(
            f"tracking.dvc_root: {root} is not a DVC repository (no .dvc/): run `dvc init` "
            "there, or set tracking.dvc_root"
        )
    if os.environ.get(ALLOW_OUTSIDE_ENV, "") not in ("1", "true", "yes"):
        for key, value in flat.items():
            if key.rsplit(".", 1)[-1] not in OUTPUT_DIR_KEYS or not value:
                continue
            path = Path(os.path.normpath(params.resolve(str(value))))
            if not _inside(path, root):
                raise ConfigError(
                    f"{key}: {value!r} is {path}, outside the project {root} "
                    f"(set {ALLOW_OUTSIDE_ENV}=1 to allow it)"
                )
    _check_tracking_uri(tracking.mlflow_uri, root)
    train = getattr(params, "train", None)
    if getattr(train, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device: 'cuda', but torch sees no CUDA device (use auto or cpu)"
            )


# --------------------------------------------------------------------------- data


def data_variant_dir(modality: Any, params: Any) -> str:
    """DVC-root-relative directory of the data variant of ``params`` (data settings that
    differ from the params file's): ``runs/<modality>/data-<key>``."""
    effective = to_dict(params)
    data = {s: effective[s] for s in modality.data_sections}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return f"{RUNS_DIR}/{modality.name}/data-{key}"


def _lock_params(lock: Path, params_file: str) -> dict[str, Any] | None:
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        return flatten(stages["prepare"]["params"][params_file])
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None


def current_prepared(modality: Any, params: Any) -> Path | None:
    """The prepared data these params would use, when it is already there and was prepared
    from the same data settings (DVC's lock says so); ``None`` when it would be (re)made."""
    root = Path(params.tracking.dvc_root).resolve()
    flat = flatten({s: to_dict(params)[s] for s in modality.data_sections})
    variant = root / data_variant_dir(modality, params)
    candidates = [
        (variant / "prepared", variant / "dvc.lock", f"{variant.relative_to(root)}/params.yaml")
    ]
    if not (root / RUNS_DIR / modality.name / "purged_ids.parquet").is_file():
        # once rows were purged, every run prepares its data through the variant stage
        main = root / modality.prepared_out(params)
        candidates.insert(0, (main, root / modality.lock_file, modality.params_file))
    for prepared, lock, params_file in candidates:
        if not (prepared / "meta.json").is_file():
            continue
        recorded = _lock_params(lock, params_file)
        if recorded is None:
            continue
        settings = {k: v for k, v in flat.items() if not k.endswith("out_dir")}
        if all(
            recorded.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()
        ):
            return prepared
    return None


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """No INFO lines from ``name`` meanwhile: a check's temporary preparation is not news,
    and an input error must stay the one line on stderr."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


@dataclass(frozen=True)
class _Index:
    """Ids, splits and labels of prepared data (no features): what a request resolves on."""

    ids: np.ndarray
    split: np.ndarray
    y: np.ndarray
    meta: dict

    def split_ids(self, split: str) -> np.ndarray:
        return self.ids[self.split == split]


def _read_index(prepared: Path) -> _Index:
    table = pq.read_table(prepared / "samples.parquet", columns=["sample_id", "split", "label"])
    return _Index(
        np.array(table.column("sample_id").to_pylist(), dtype=str),
        np.array(table.column("split").to_pylist(), dtype=str),
        table.column("label").to_numpy().astype(np.int64),
        json.loads((prepared / "meta.json").read_text()),
    )


@contextmanager
def _image_data(modality: Any, params: Any) -> Iterator[Path]:
    """The prepared image data for these params: the current one, or the source prepared
    afresh in a temporary folder (deleted after), every source error as a DataError."""
    prepared = current_prepared(modality, params)
    if prepared is not None:
        yield prepared
        return
    from pipeline_lib.config import replace
    from pipeline_lib.data.images import FASHION_MNIST_DEFAULT_DIR, prepare_dataset

    cfg = params.data
    path = cfg.path
    if cfg.name == "parquet" and not path:
        raise ConfigError("data.path: the parquet source needs the path of the table")
    if path:
        resolved = params.resolve(path)
        shown = repr(path) + ("" if str(resolved) == path else f" ({resolved})")
        if cfg.name == "parquet" and not resolved.is_file():
            raise DataError(f"data.path: {shown} is not a file")
        if cfg.name == "fashion-mnist" and not resolved.is_dir():
            raise DataError(f"data.path: Fashion-MNIST directory {resolved} does not exist")
        cfg = replace(cfg, path=str(resolved))
    elif cfg.name == "fashion-mnist" and not Path(FASHION_MNIST_DEFAULT_DIR).is_dir():
        raise DataError(
            f"data.path: Fashion-MNIST directory {FASHION_MNIST_DEFAULT_DIR} does not exist "
            "(install Debian's dataset-fashion-mnist or set data.path)"
        )
    with tempfile.TemporaryDirectory(prefix="unlearn-check-") as tmp:
        out = Path(tmp) / "prepared"
        try:
            with _quiet("pipeline_lib.data"):
                prepare_dataset(cfg, out)
        except DataError:
            raise
        except (ValueError, OSError) as exc:
            raise DataError(f"data ({cfg.name}): {exc}") from None
        yield out


# --------------------------------------------------------------------------- requests


def _check_request_id(modality: Any, root: Path, source: str, request: DeletionRequest) -> None:
    """The request's id must not name another request of the project: a request file under
    ``requests/`` (by its id or its file name) or an earlier run directory with other
    content, or a directory of the runs tree that is not a request's (a data variant)."""
    rid = request.request_id
    here = Path(source).resolve()
    requests_dir = root / "requests"
    for file in sorted(requests_dir.glob("*.y*ml")) if requests_dir.is_dir() else []:
        if file.resolve() == here:
            continue
        try:
            other = load_request(file)
        except (RequestError, OSError):
            continue
        if (other.request_id == rid or file.stem == rid) and other.digest != request.digest:
            raise RequestError(
                f"{source}: request id {rid!r} collides with {file.relative_to(root)} "
                f"(request {other.request_id!r}, other content); give the new request its own id"
            )
    run_dir = root / RUNS_DIR / modality.name / rid
    if run_dir.exists():
        recorded = run_dir / "request.yaml"
        if not recorded.is_file():
            raise RequestError(
                f"{source}: request id {rid!r} collides with {run_dir.relative_to(root)}, "
                "which is not a request's run directory; give the request another id"
            )
        try:
            other = load_request(recorded)
        except RequestError:
            return
        if other.digest != request.digest:
            raise RequestError(
                f"{source}: request id {rid!r} was already used for a different request "
                f"({recorded.relative_to(root)}); give the new request its own id"
            )


def _check_text_requests(modality: Any, params: Any, requests: list) -> None:
    from pipeline_lib.data.text import PREPARED_DIR, prepare_corpus

    def check(prepared: Path) -> None:
        for source, req in requests:
            try:
                modality.check_request(req, str(prepared))
            except RequestError as exc:
                raise RequestError(f"{source}: {exc}") from None

    prepared = params.resolve(PREPARED_DIR)
    if (prepared / "meta.json").is_file():
        check(prepared)
        return
    with tempfile.TemporaryDirectory(prefix="unlearn-check-") as tmp:
        try:
            with _quiet("pipeline_lib.data"):
                prepare_corpus(params.text, Path(tmp) / "prepared")
        except (ValueError, OSError) as exc:
            raise DataError(f"text ({params.text.name}): {exc}") from None
        check(Path(tmp) / "prepared")


# --------------------------------------------------------------------------- counts


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (MemAvailable on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_store_size(
    key: str, n_models: int, meta: dict, output_bytes: int = 2, kernel: bool = True
) -> int:
    """Refuse a store of ``n_models`` whose outputs (models × samples × classes), masks and,
    for the datamodel fit, M × M float64 kernel would not fit in the memory available now.
    Returns the estimate in bytes."""
    n = int(meta.get("n_train", 0)) + int(meta.get("n_test", 0))
    classes = int(meta.get("n_classes", 1))
    per_model = n * classes * output_bytes + math.ceil(int(meta.get("n_train", 0)) / 8) + 8
    need = n_models * per_model + (n_models * n_models * 8 if kernel else 0)
    have = available_memory()
    if need > have:
        raise ConfigError(
            f"{key}: {n_models:,} models need about {_human(need)} of memory (outputs on "
            f"{n:,} samples × {classes} classes, masks"
            + (", the M×M datamodel kernel" if kernel else "")
            + f"); {_human(have)} is available"
        )
    return need


def check_model(model_cfg: Any, meta: dict) -> None:
    """The model section fits the data: the model is built once on the data's sample shape
    and class count (``model.vit_patch`` must divide the image side, a CNN needs images)."""
    from pipeline_lib.models.image import build_model

    build_model(model_cfg, tuple(meta["shape"]), int(meta["n_classes"]), seed=0)


# --------------------------------------------------------------------------- all


def check_inputs(
    modality: Any,
    params: Any,
    requests: Iterable[tuple[str, DeletionRequest]] = (),
    *,
    store: tuple[str, int, bool] | None = None,
    data: bool = True,
) -> dict[str, Any]:
    """Check everything a command is given, before any work; raise ConfigError, DataError or
    RequestError (one line naming the key, file or column).

    ``requests``: ``(source, request)`` pairs to check against the data and the project.
    ``store``: ``(key, n_models, with_kernel)`` of a store the command would fill.
    ``data``: whether the command reads the data source (a command on the ledger alone does
    not). Returns ``{"prepared": meta.json of the data checked}`` (empty without ``data``)."""
    requests = list(requests)
    check_params(params)
    root = Path(params.tracking.dvc_root).resolve()
    for source, req in requests:
        _check_request_id(modality, root, source, req)
    if not data:
        return {}
    if modality.name == "text":
        if requests:
            _check_text_requests(modality, params, requests)
        return {}
    with _image_data(modality, params) as prepared:
        index = _read_index(prepared)
        for source, req in requests:
            try:
                extract_forget_set(req, index)
            except RequestError as exc:
                raise RequestError(f"{source}: {exc}") from None
        if store is not None:
            check_store_size(store[0], store[1], index.meta, kernel=store[2])
        check_model(params.model, index.meta)
        return {"prepared": index.meta}
