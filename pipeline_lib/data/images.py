"""Dataset registry (:data:`DATASETS`), the ``data`` section and the prepared-data format.

A dataset source is a loader ``fn(cfg: DataConfig) -> RawDataset`` registered with
``@DATASETS.register("<name>")``; ``data.name`` in params.yaml picks one.

Prepared data is a directory with ``samples.parquet`` (columns ``sample_id`` string, ``split``
``train``/``test``, ``label`` int64, ``features`` fixed-size list of float32, the flattened
sample) and ``meta.json`` (sample shape, class count, content hash, counts, source).
``sample_id`` is stable: derived from the source, never from row order after shuffling.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import AfterValidator

from pipeline_lib.io import atomic_path
from pipeline_lib.registry import Registry
from pipeline_lib.schema import ConfigError, Field, Float, Int, Str, section

log = logging.getLogger(__name__)

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")

#: Dataset sources by ``data.name``: ``fn(cfg: DataConfig) -> RawDataset``.
DATASETS: Registry[Callable[[DataConfig], RawDataset]] = Registry("dataset", key="data.name")


@section("data")
class DataConfig:
    """Which dataset to prepare and how to split it."""

    name: Annotated[Str, AfterValidator(DATASETS.check)] = "digits"
    #: fashion-mnist: directory of IDX files; parquet: path of the user's table.
    path: Str | None = None
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    seed: Int = 0
    #: Optional seeded subsample sizes (quick runs on large sets); null keeps everything.
    max_train: Int | None = Field(None, gt=0)
    max_test: Int | None = Field(None, gt=0)
    out_dir: Str = "data/prepared"


@dataclass(frozen=True)
class RawDataset:
    """Samples as loaded from a source. ``X``: (N, *shape) float32; ``y``: (N,) int64."""

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray
    #: Official split per sample ("train"/"test") or None when the source has none.
    split: np.ndarray | None
    n_classes: int
    source: str


@dataclass(frozen=True)
class Prepared:
    """A prepared dataset read back from disk."""

    ids: np.ndarray  # (N,) str
    split: np.ndarray  # (N,) str
    X: np.ndarray  # (N, *shape) float32
    y: np.ndarray  # (N,) int64
    meta: dict

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    def subset(self, ids: np.ndarray | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) for ``ids`` in the order given; unknown ids raise KeyError naming one."""
        index = {sid: i for i, sid in enumerate(self.ids)}
        try:
            rows = np.fromiter((index[s] for s in ids), dtype=np.int64, count=len(ids))
        except KeyError as exc:
            raise KeyError(f"sample id {exc.args[0]!r} is not in the prepared data") from None
        return self.X[rows], self.y[rows]

    def split_ids(self, split: str) -> np.ndarray:
        return self.ids[self.split == split]


# --------------------------------------------------------------------------- sources


@DATASETS.register("digits")
def load_digits_source(cfg: DataConfig) -> RawDataset:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    ids = np.array([f"digits-{i:04d}" for i in range(len(X))])
    return RawDataset(
        ids, X, bunch.target.astype(np.int64), None, 10, "sklearn.datasets.load_digits"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} elements, found {arr.size}")
    return arr.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory}: missing {stem}[.gz]. Fashion-MNIST ships in Debian's "
        "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), or set "
        "data.path to a directory holding the four IDX files"
    )


@DATASETS.register("fashion-mnist")
def load_fashion_mnist_source(cfg: DataConfig) -> RawDataset:
    """Fashion-MNIST IDX files from ``data.path`` (default: Debian's package directory).

    The official 60k/10k split is kept; ids are ``fmnist-train-00000`` / ``fmnist-test-00000``.
    """
    directory = Path(cfg.path or FASHION_MNIST_DEFAULT_DIR)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory not found: {directory} (install Debian's "
            "dataset-fashion-mnist or set data.path)"
        )
    parts = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if len(images) != len(labels):
            raise ValueError(f"{directory}: {split} images and labels differ in count")
        ids = np.array([f"fmnist-{split}-{i:05d}" for i in range(len(images))])
        parts.append((ids, images, labels, np.full(len(images), split)))
    ids, images, labels, split_arr = (np.concatenate(p) for p in zip(*parts, strict=True))
    X = (images.astype(np.float32) / 255.0)[:, None, :, :]
    return RawDataset(ids, X, labels.astype(np.int64), split_arr, 10, str(directory))


class DataError(ValueError):
    """A data source is unusable (unreadable file, missing column, nulls, ragged or non-finite
    features, labels that are not class indices 0..k-1); the message names the file and column."""


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # Arrow repeats the path ("Could not open Parquet input source '<path>': ..."); keep the why.
        why = why.split("': ", 1)[-1]
        raise DataError(f"{path}: not a readable Parquet table ({why})") from None


def _null_rows(col: pa.ChunkedArray) -> np.ndarray:
    return np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))


def _refuse_nulls(path: Path, table: pa.Table, name: str) -> None:
    col = table.column(name)
    if col.null_count:
        first = int(_null_rows(col)[0])
        raise DataError(
            f"{path}: column {name} holds {col.null_count} null value(s) (first in row {first})"
        )


def _parquet_ids(path: Path, table: pa.Table) -> np.ndarray:
    _refuse_nulls(path, table, "sample_id")
    ids = np.array([str(s) for s in table.column("sample_id").to_pylist()])
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise DataError(f"{path}: column sample_id holds an empty id (row {int(empty[0])})")
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dupe = str(values[counts > 1][0])
        raise DataError(
            f"{path}: sample_id values are not unique ({int((counts > 1).sum())} id(s) repeated, "
            f"e.g. {dupe!r} in {int(counts[values == dupe][0])} rows)"
        )
    return ids


def _parquet_labels(path: Path, table: pa.Table) -> tuple[np.ndarray, int]:
    """Labels as int64 and the class count; refuses nulls, non-integers and classes that
    are not exactly 0..k-1 (labels 1..k would silently make k+1 classes)."""
    _refuse_nulls(path, table, "label")
    label_type = table.schema.field("label").type
    if pa.types.is_floating(label_type):
        raw_y = np.asarray(table.column("label").to_numpy())
        bad = np.flatnonzero(~np.isfinite(raw_y) | (raw_y != np.round(raw_y)))
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{path}: column label must hold integer class indices, found {float(raw_y[i])} "
                f"in row {i} ({len(bad)} such row(s); column type {label_type})"
            )
    elif not pa.types.is_integer(label_type):
        raise DataError(
            f"{path}: column label must hold integer class indices (column type {label_type}; "
            "strings and other types are not converted)"
        )
    y = np.asarray(table.column("label").to_numpy()).astype(np.int64)
    negative = np.flatnonzero(y < 0)
    if len(negative):
        i = int(negative[0])
        raise DataError(
            f"{path}: column label must hold non-negative class indices, found {int(y[i])} "
            f"in row {i}"
        )
    n_classes = int(y.max()) + 1
    absent = np.setdiff1d(np.arange(n_classes), y)
    if len(absent):
        present = np.unique(y)
        shown = ", ".join(str(int(c)) for c in present[:10]) + (" ..." if len(present) > 10 else "")
        raise DataError(
            f"{path}: column label must hold contiguous class indices 0..{n_classes - 1}, but "
            f"class {int(absent[0])} has no rows ({len(absent)} missing; labels present: {shown}; "
            "renumber the classes from 0)"
        )
    return y, n_classes


def _first_ragged_row(values: list) -> tuple[int, tuple, tuple]:
    shape0 = np.shape(values[0])
    for i, v in enumerate(values):
        try:
            shape = np.shape(v)
        except ValueError:  # ragged inside the row itself
            return i, shape0, ("ragged",)
        if shape != shape0:
            return i, shape0, shape
    return 0, shape0, shape0


def _nested_column(path: Path, table: pa.Table, name: str) -> np.ndarray:
    """A ``features`` / ``image`` column of (nested) lists as a float32 array."""
    _refuse_nulls(path, table, name)
    col = table.column(name)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and not (
        pa.types.is_fixed_size_list(col.type)
    ):
        raise DataError(f"{path}: column {name} must hold lists of numbers (type {col.type})")
    inner_nulls = col.combine_chunks().flatten().null_count
    if inner_nulls:
        raise DataError(f"{path}: column {name} holds {inner_nulls} null value(s) inside its lists")
    values = col.to_pylist()
    try:
        return np.array(values, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        i, shape0, shape = _first_ragged_row(values)  # only on failure: a pass over every row
        if shape != shape0:
            raise DataError(
                f"{path}: column {name} is ragged: row 0 has shape {shape0}, row {i} has "
                f"{shape} (every sample needs the same number of features)"
            ) from None
        raise DataError(f"{path}: column {name} must hold numbers ({exc})") from None


def _refuse_non_finite(path: Path, name: str, X: np.ndarray, ids: np.ndarray) -> None:
    bad = ~np.isfinite(X.reshape(len(X), -1))
    n_bad = int(bad.sum())
    if n_bad:
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataError(
            f"{path}: column {name} holds {n_bad} non-finite value(s) (NaN or inf) in "
            f"{len(rows)} row(s), first in row {int(rows[0])} (sample_id {str(ids[rows[0]])!r})"
        )


@DATASETS.register("parquet")
def load_parquet_source(cfg: DataConfig) -> RawDataset:
    """A user's table: ``sample_id``, ``label`` and either a ``features`` list column, an
    ``image`` column (nested lists, H×W or C×H×W), or plain numeric feature columns.
    An optional ``split`` column (train/test) is kept; otherwise the split is seeded.

    The table is checked before anything is written; a :class:`DataError` names the file
    and the column: no rows, a missing ``sample_id``/``label``, null or repeated ids, null,
    fractional or non-numeric labels, classes that are not 0..k-1, ragged, null or
    non-finite features, a split other than train/test."""
    if not cfg.path:
        raise ConfigError("data.path: the parquet dataset needs the path of a Parquet table")
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path: Parquet table not found: {path}")
    table = _read_parquet(path)
    cols = set(table.column_names)
    missing = {"sample_id", "label"} - cols
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(sorted(missing))}")
    if table.num_rows == 0:
        raise DataError(f"{path}: the table has no rows")
    ids = _parquet_ids(path, table)
    y, n_classes = _parquet_labels(path, table)
    if "features" in cols:
        X = _nested_column(path, table, "features")
        _refuse_non_finite(path, "features", X, ids)
    elif "image" in cols:
        X = _nested_column(path, table, "image")
        _refuse_non_finite(path, "image", X, ids)
        if X.ndim == 3:
            X = X[:, None]
    else:
        reserved = {"sample_id", "label", "split"}
        numeric = [
            f.name
            for f in table.schema
            if f.name not in reserved
            and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))
        ]
        if not numeric:
            raise DataError(
                f"{path}: no 'features' or 'image' column and no numeric feature columns"
            )
        for c in numeric:
            _refuse_nulls(path, table, c)
        X = np.stack([table.column(c).to_numpy().astype(np.float32) for c in numeric], axis=1)
        for j, c in enumerate(numeric):
            _refuse_non_finite(path, c, X[:, j : j + 1], ids)
    split = None
    if "split" in cols:
        _refuse_nulls(path, table, "split")
        split = np.array(table.column("split").to_pylist(), dtype=str)
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise DataError(f"{path}: split column holds {str(bad[0])!r}; valid: train, test")
    return RawDataset(ids, X, y, split, n_classes, str(path))


def check_raw(raw: RawDataset) -> None:
    """What every source must deliver, whatever it checked itself: rows, unique ids, finite
    features and labels in 0..n_classes-1; a :class:`DataError` naming the source otherwise."""
    src = raw.source
    if len(raw.ids) == 0:
        raise DataError(f"{src}: the dataset has no samples")
    if not (len(raw.ids) == len(raw.X) == len(raw.y)):
        raise DataError(f"{src}: ids, features and labels differ in count")
    if len(np.unique(raw.ids)) != len(raw.ids):
        raise DataError(f"{src}: sample_id values are not unique")
    n_bad = int((~np.isfinite(raw.X)).sum())
    if n_bad:
        raise DataError(f"{src}: {n_bad} non-finite feature value(s) (NaN or inf)")
    if raw.y.min() < 0 or raw.y.max() >= raw.n_classes:
        raise DataError(
            f"{src}: labels must lie in 0..{raw.n_classes - 1}, "
            f"found {int(raw.y.min())}..{int(raw.y.max())}"
        )


def get_dataset_loader(name: str) -> Callable[[DataConfig], RawDataset]:
    """The registered loader of ``name``; an unknown name lists the valid ones."""
    return DATASETS.lookup(name)


# --------------------------------------------------------------------------- prepare


def assign_split(raw: RawDataset, cfg: DataConfig) -> np.ndarray:
    """The source's split if it has one, else a seeded stratified split.

    Ids are sorted first so the split depends on the set of ids, not on their order."""
    if raw.split is not None:
        return raw.split.copy()
    if not 0.0 < cfg.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction: must be in (0, 1), got {cfg.test_fraction}")
    order = np.argsort(raw.ids, kind="stable")
    rng = np.random.default_rng(cfg.seed)
    split = np.full(len(raw.ids), "train", dtype=object)
    for c in np.unique(raw.y):
        members = order[raw.y[order] == c]
        members = members[rng.permutation(len(members))]
        n_test = int(round(cfg.test_fraction * len(members)))
        split[members[:n_test]] = "test"
    return split.astype(str)


def _subsample(mask: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(mask)
    if limit is None or limit >= len(idx):
        return idx
    return np.sort(rng.choice(idx, size=limit, replace=False))


def content_hash(ids: np.ndarray, split: np.ndarray, X: np.ndarray, y: np.ndarray) -> str:
    """sha256 over ids, splits, labels and feature bytes, in sample_id order."""
    order = np.argsort(ids, kind="stable")
    h = hashlib.sha256()
    h.update("\n".join(ids[order]).encode())
    h.update("\n".join(split[order]).encode())
    h.update(np.ascontiguousarray(y[order], dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(X[order], dtype="<f4").tobytes())
    return h.hexdigest()


def prepare_dataset(
    cfg: DataConfig, out_dir: str | Path | None = None, exclude: Iterable[str] | None = None
) -> dict:
    """Load ``cfg.name``, split, subsample, and write the prepared directory atomically.

    ``exclude``: sample ids whose rows are left out (ids purged after their deletion); they
    are dropped after the subsampling, so every other row is the one the same settings give
    without them. ``meta.json`` then counts them (``n_purged``).

    Returns the metadata written to ``meta.json``.
    """
    raw = get_dataset_loader(cfg.name)(cfg)
    check_raw(raw)
    split = assign_split(raw, cfg)
    rng = np.random.default_rng(cfg.seed + 1)
    keep = np.concatenate(
        [
            _subsample(split == "train", cfg.max_train, rng),
            _subsample(split == "test", cfg.max_test, rng),
        ]
    )
    keep.sort()
    n_purged = 0
    if exclude is not None:
        present = np.isin(raw.ids[keep], np.asarray(sorted(set(exclude)), dtype=str))
        n_purged = int(present.sum())
        keep = keep[~present]
    ids, X, y, split = raw.ids[keep], raw.X[keep], raw.y[keep], split[keep]
    if (split == "train").sum() == 0 or (split == "test").sum() == 0:
        raise ValueError(f"dataset {cfg.name!r}: train and test splits must both be non-empty")
    flat = np.ascontiguousarray(X.reshape(len(X), -1), dtype=np.float32)
    table = pa.table(
        {
            "sample_id": pa.array(ids, pa.string()),
            "split": pa.array(split, pa.string()),
            "label": pa.array(y, pa.int64()),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1]),
        }
    )
    meta = {
        "dataset": cfg.name,
        "source": raw.source,
        "shape": list(X.shape[1:]),
        "n_classes": raw.n_classes,
        "n_train": int((split == "train").sum()),
        "n_test": int((split == "test").sum()),
        "content_hash": content_hash(ids, split, X, y),
    }
    if exclude is not None:
        meta["n_purged"] = n_purged
    out = Path(out_dir or cfg.out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(table, tmp / "samples.parquet")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("prepared %s: %d train, %d test -> %s", cfg.name, meta["n_train"], meta["n_test"], out)
    return meta


def load_prepared(path: str | Path, verify: bool = False) -> Prepared:
    """Read a prepared directory; ``verify`` recomputes the content hash."""
    path = Path(path)
    if not (path / "samples.parquet").is_file() or not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a prepared dataset (samples.parquet/meta.json missing)"
        )
    meta = json.loads((path / "meta.json").read_text())
    table = pq.read_table(path / "samples.parquet")
    ids = np.array(table.column("sample_id").to_pylist(), dtype=str)
    split = np.array(table.column("split").to_pylist(), dtype=str)
    y = table.column("label").to_numpy().astype(np.int64)
    feats = table.column("features").combine_chunks()
    X = (
        feats.flatten()
        .to_numpy(zero_copy_only=False)
        .reshape(len(ids), *meta["shape"])
        .astype(np.float32)
    )
    if verify and content_hash(ids, split, X, y) != meta["content_hash"]:
        raise ValueError(f"{path}: content hash does not match meta.json (data changed on disk)")
    return Prepared(ids, split, X, y, meta)
