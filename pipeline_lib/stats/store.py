"""Sharded statistics: Parquet shards of a split, per-shard partial sums, one exact reduce.

The unit of distributed work (design.md rule 4) is a *shard*: a Parquet file of
``sample_id``, ``label`` and the flattened ``features`` of a contiguous block of the split.
A shard task maps one shard to *sums* (never means), so that the reduce step is a plain
addition followed by one division; the sum of shard sums equals the unsharded sum up to
floating-point reassociation (float64 test: any shard count, any worker count).

- Fisher diagonal (algorithms.md §1): Σ_{x∈shard} (∂ log p_θ(y|x)/∂θ)² and the count, from
  :func:`pipeline_lib.stats.fisher.fisher_diagonal_sum`; ``true_sampled`` labels are keyed by
  sample id, so they do not depend on how the split is cut.
- Activation Gram matrices (algorithms.md §5): :mod:`pipeline_lib.stats.activations`.

Results are safetensors files holding the statistics, with the config that produced them
and a content hash in the metadata, written atomically (:func:`save_stats`). A file is named
by its *identity* (:func:`stats_identity`): the statistic, the split, the model weights
digest, the prepared data's content hash, a digest of the exact sample ids (so two requests
with splits of the same size never share a file, and two requests with the same forget set
do) and the options that change the values. Anyone who knows the model and the request can
therefore find the file without computing it (:func:`stats_path`, :func:`find_stats`):
``unlearn stats`` and the pipeline's Fisher step write and read the same store.

This module is pure: the Ray edge is ``tasks/stats.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from torch import nn

from pipeline_lib.io import atomic_path, save_weights, state_dict_digest
from pipeline_lib.stats.fisher import fisher_diagonal_sum

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.parquet"


# --------------------------------------------------------------------------- shards


def shard_bounds(n: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of ``n_shards`` contiguous, near-equal shards of ``n`` rows
    (never an empty shard: at most ``n`` shards)."""
    if n_shards <= 0:
        raise ValueError(f"n_shards must be > 0, got {n_shards}")
    if n == 0:
        raise ValueError("cannot shard an empty split")
    k = min(n_shards, n)
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def write_shards(
    ids: Sequence[str], X: np.ndarray, y: np.ndarray, out_dir: str | Path, n_shards: int
) -> list[Path]:
    """Write (ids (N,), X (N, *shape), y (N,)) as ``n_shards`` Parquet files in ``out_dir``
    (the directory is replaced atomically, with a ``shards.json`` listing shape and counts).
    Returns the shard paths in order."""
    X = np.asarray(X)
    if not (len(ids) == len(X) == len(y)):
        raise ValueError(f"write_shards: {len(ids)} ids, {len(X)} rows, {len(y)} labels")
    bounds = shard_bounds(len(ids), n_shards)
    width = int(np.prod(X.shape[1:]))
    names = []
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for i, (a, b) in enumerate(bounds):
            flat = np.ascontiguousarray(X[a:b].reshape(b - a, width), dtype=np.float32)
            table = pa.table(
                {
                    "sample_id": pa.array(np.asarray(ids[a:b], dtype=str), pa.string()),
                    "label": pa.array(np.asarray(y[a:b], dtype=np.int64)),
                    "features": pa.FixedSizeListArray.from_arrays(
                        pa.array(flat.reshape(-1)), width
                    ),
                }
            )
            name = f"shard-{i:05d}.parquet"
            pq.write_table(table, tmp / name)
            names.append(name)
        meta = {"shape": list(X.shape[1:]), "n": len(ids), "shards": names}
        (tmp / "shards.json").write_text(json.dumps(meta, indent=2) + "\n")
    return [out_dir / n for n in names]


def read_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) str, X (n, *shape) float32, y (n,) int64) of one shard."""
    path = Path(path)
    meta = json.loads((path.parent / "shards.json").read_text())
    table = pq.read_table(path)
    ids = np.array(table.column("sample_id").to_pylist(), dtype=str)
    X = (
        table.column("features")
        .combine_chunks()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .reshape(len(ids), *meta["shape"])
    )
    return ids, X.astype(np.float32, copy=False), table.column("label").to_numpy()


# --------------------------------------------------------------------------- Fisher


def with_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself if its parameters are already ``dtype``, else a converted copy (the
    caller's model is never changed)."""
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    return copy.deepcopy(model).to(dtype)


def fisher_shard_sums(
    model: nn.Module,
    shard: str | Path,
    kind: str,
    batch_size: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], int]:
    """Partial sums of one shard: ({param: Σ squared per-sample grads}, count).

    ``dtype`` is the compute dtype of the model copy and the inputs (float64 in the
    equality tests)."""
    ids, X, y = read_shard(shard)
    model = with_dtype(model, dtype)
    return fisher_diagonal_sum(
        model,
        torch.from_numpy(X).to(dtype),
        torch.from_numpy(y),
        kind=kind,
        batch_size=batch_size,
        seed=seed,
        sample_ids=list(ids),
    )


def reduce_sums(
    parts: Iterable[tuple[Mapping[str, torch.Tensor], int]],
) -> tuple[dict[str, torch.Tensor], int]:
    """Add partial sums in the order given (callers pass shard order, so the result does not
    depend on which worker finished first). Returns (sums, total count)."""
    total: dict[str, torch.Tensor] | None = None
    count = 0
    for sums, n in parts:
        if total is None:
            total = {k: v.clone() for k, v in sums.items()}
        else:
            if total.keys() != sums.keys():
                raise ValueError("reduce_sums: partial sums cover different tensors")
            for k in total:
                total[k] += sums[k]
        count += int(n)
    if total is None:
        raise ValueError("reduce_sums: no partial sums")
    return total, count


def means(sums: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    if n <= 0:
        raise ValueError("statistics of an empty sample set")
    return {k: v / n for k, v in sums.items()}


def retain_from_full(
    full_sums: Mapping[str, torch.Tensor],
    n_full: int,
    forget_sums: Mapping[str, torch.Tensor],
    n_forget: int,
) -> dict[str, torch.Tensor]:
    """I_R = (Σ_D − Σ_F) / (N − |F|) in float64, from the full-data sums of a model version
    (D: its training set, N samples) and the forget set's sums (F ⊂ D, |F| samples).

    Exact for sums: per-sample squared gradients of the per-sample kinds do not depend on
    which other samples are summed (``true_sampled`` labels are keyed by sample id), so
    Σ_R = Σ_D − Σ_F up to floating-point reassociation; the subtraction is done in float64
    (keep Σ_D in float64: cancellation loses what float32 sums would not hold) and the
    rounding residue below zero is clamped to 0 (a Fisher diagonal is non-negative)."""
    n_r = int(n_full) - int(n_forget)
    if n_r <= 0:
        raise ValueError(f"retain_from_full: {n_forget} forget samples of {n_full}: no retain set")
    if full_sums.keys() != forget_sums.keys():
        raise ValueError("retain_from_full: full and forget sums cover different tensors")
    return {
        k: ((full_sums[k].double() - forget_sums[k].double()) / n_r).clamp_min(0.0)
        for k in full_sums
    }


# --------------------------------------------------------------------------- files


def save_stats(
    tensors: Mapping[str, torch.Tensor], path: str | Path, config: Mapping[str, Any]
) -> str:
    """Write ``tensors`` as safetensors atomically, with ``config`` (JSON) and the content
    hash in the metadata. Returns the content hash."""
    return save_weights(dict(tensors), path, {"config": json.dumps(config, sort_keys=True)})


class CorruptStats(ValueError):
    """A statistics file whose tensors do not match the content hash in its metadata."""


def load_stats(
    path: str | Path, verify: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with ``config`` decoded and ``digest``) of a statistics file.
    ``verify``: recompute the content hash and raise :class:`CorruptStats` if it differs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # truncated or not safetensors at all
        raise CorruptStats(f"statistics file {path} is unreadable: {exc}") from exc
    meta["config"] = json.loads(meta.get("config", "{}"))
    if verify and state_dict_digest(tensors) != meta.get("digest"):
        raise CorruptStats(
            f"statistics file {path}: its tensors do not match the content hash in its "
            f"metadata ({str(meta.get('digest'))[:16]}); the file was changed or damaged"
        )
    return tensors, meta


# --------------------------------------------------------------------------- identity


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the sample ids in order (one per line)."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def stats_identity(
    statistic: str,
    split: str,
    weights_digest: str,
    data_content_hash: str,
    ids: Sequence[str],
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a statistics file is *of*: everything that changes its values, and nothing that
    does not (shard count, workers and batch size only reorder float additions)."""
    return {
        "statistic": statistic,
        "split": split,
        "weights_digest": weights_digest,
        "data_content_hash": data_content_hash,
        "ids_digest": ids_digest(ids),
        "n": len(ids),
        **dict(options or {}),
    }


def stats_key(identity: Mapping[str, Any]) -> str:
    """16 hex digits naming ``identity``."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()[:16]


def stats_path(out_dir: str | Path, identity: Mapping[str, Any]) -> Path:
    """``<out_dir>/<statistic>-<split>-<key>.safetensors``."""
    return (
        Path(out_dir)
        / f"{identity['statistic']}-{identity['split']}-{stats_key(identity)}.safetensors"
    )


def find_stats(
    out_dir: str | Path, identity: Mapping[str, Any]
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The stored statistics of ``identity``, verified, or None when there are none.

    A file that is damaged (content hash mismatch, unreadable) or whose recorded identity
    differs is reported with a warning and treated as missing: the caller recomputes it and
    the atomic write replaces it."""
    path = stats_path(out_dir, identity)
    if not path.is_file():
        return None
    try:
        tensors, meta = load_stats(path, verify=True)
    except CorruptStats as exc:
        log.warning("%s; recomputing it", exc)
        return None
    recorded = meta["config"].get("identity")
    if recorded != dict(identity):
        log.warning("statistics file %s records a different identity; recomputing it", path)
        return None
    return path, tensors, meta
