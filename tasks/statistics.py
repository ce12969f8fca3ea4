"""Prefect tasks of the statistics store: find a statistic of a model by its identity, or
compute it (Fisher diagonals locally or sharded on Ray; activation Gram matrices on Ray) and
store it under that identity. The ``statistics`` flow and the unlearning pipeline share them.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.logging import get_run_logger

from pipeline_lib.config import FisherConfig, Params, to_dict
from pipeline_lib.data.images import Prepared, load_prepared
from pipeline_lib.data.requests import load_manifests
from pipeline_lib.io import load_weights
from pipeline_lib.modalities.image import fisher_config, fisher_split_ids, load_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.stats.store import (
    find_stats,
    means,
    reduce_sums,
    save_stats,
    stats_identity,
    stats_path,
    write_shards,
)
from tasks import stats as ray_stats

STATISTICS = ("fisher", "activations")


STATISTICS = ("fisher", "activations")


def split_ids(params: Params, statistic: str, split: str) -> np.ndarray:
    """The ids a statistic is computed over: for ``fisher`` exactly the pipeline's I_F / I_R
    samples (``fisher.max_retain`` applies); for ``activations`` the whole split."""
    man = load_manifests(params.resolve(params.request.out_dir))
    if statistic == "fisher":
        return fisher_split_ids(man, split, params.fisher)
    if split not in ("forget", "retain"):
        raise ValueError(f"split {split!r} unknown; valid: forget, retain")
    return man.forget_ids if split == "forget" else man.retain_ids


@task(name="write-shards")
def shard_split(params: Params, statistic: str, split: str) -> list[str]:
    """Write the split's Parquet shards (named by a hash of the data, the ids and the shard
    count) unless they exist: the directory is written atomically, so it is complete if its
    ``shards.json`` is there. Returns the shard paths in order."""
    data = load_prepared(params.resolve(params.data.out_dir))
    ids = split_ids(params, statistic, split)
    X, y = data.subset(ids)
    key = hashlib.sha256(
        (data.content_hash + "|" + "\n".join(ids) + f"|{params.stats.n_shards}").encode()
    ).hexdigest()[:16]
    out = params.resolve(params.stats.out_dir) / "shards" / f"{split}-{key}"
    if (out / "shards.json").is_file():
        return [str(p) for p in sorted(out.glob("shard-*.parquet"))]
    return [str(p) for p in write_shards(ids, X, y, out, params.stats.n_shards)]


def identity_for(
    params: Params, statistic: str, split: str, weights_digest: str, content_hash: str
) -> dict[str, Any]:
    """The identity (:func:`pipeline_lib.stats.store.stats_identity`) of a statistic of the model
    with ``weights_digest`` on this request's split."""
    ids = split_ids(params, statistic, split)
    options = fisher_options(params.fisher) if statistic == "fisher" else {}
    return stats_identity(statistic, split, weights_digest, content_hash, ids, options)


def fisher_options(cfg: FisherConfig) -> dict[str, Any]:
    """The Fisher settings that change its values (``max_retain`` acts through the ids)."""
    return {"kind": cfg.kind, "seed": cfg.seed, "dtype": "float32"}


def _save(
    params: Params, statistic: str, split: str, identity: dict[str, Any], tensors, extra: dict
) -> tuple[str, str]:
    if statistic == "fisher":
        config = fisher_config(params.fisher, split, identity["n"], **extra)
    else:
        config = {"statistic": "activations", "split": split, "n": identity["n"], **extra}
    config["identity"] = identity
    path = stats_path(params.resolve(params.stats.out_dir), identity)
    digest = save_stats(tensors, path, config)  # atomic; metadata: config and content hash
    return str(path), digest


@task(name="sharded-statistics")
def sharded_statistics(
    params: Params, statistic: str, split: str, shards: list[str], weights: dict[str, Any]
) -> dict[str, Any]:
    """One Ray task per shard, reduce in shard order, save under the statistic's identity.
    Fisher: the means I_S; activations: ``<layer>.U`` and ``<layer>.S`` of every layer's
    Gram matrix."""
    data = load_prepared(params.resolve(params.data.out_dir))
    state = load_weights(weights["path"])
    if statistic == "fisher":
        f: FisherConfig = params.fisher
        options = {"kind": f.kind, "batch_size": f.batch_size, "seed": f.seed}
    else:
        options = {"batch_size": params.stats.batch_size}
    run = ray_stats.run_shards(
        statistic,
        state,
        to_dict(params.model),
        data.shape,
        data.n_classes,
        shards,
        options,
        params.ray,
        params.stats.workers,
    )
    t0 = time.perf_counter()
    sums, n = reduce_sums(run["parts"])
    if statistic == "fisher":
        tensors = means(sums, n)
    else:
        from pipeline_lib.stats.activations import decompose_grams

        tensors = decompose_grams(sums)
    # the shard tasks' wall time and the reduce: not Ray's start-up or the shard writing
    seconds = run["wall_seconds"] + time.perf_counter() - t0
    identity = identity_for(params, statistic, split, weights["digest"], data.content_hash)
    if identity["n"] != n:
        raise RuntimeError(
            f"{statistic} of {split}: shards hold {n} samples, expected {identity['n']}"
        )
    extra = {
        "weights_digest": weights["digest"],
        "data_content_hash": data.content_hash,
        "backend": "ray",
        "n_shards": len(shards),
        "seconds": seconds,
    }
    path, digest = _save(params, statistic, split, identity, tensors, extra)
    return {
        "path": path,
        "digest": digest,
        "n": n,
        "shards": len(shards),
        "seconds": seconds,
        "wall_seconds": run["wall_seconds"],
        "samples_per_second": run["samples_per_second"],
        "workers": run["workers"],
        "nodes": run["nodes"],
        "reused": False,
        "identity": identity,
    }


def local_fisher(
    params: Params, split: str, weights: dict[str, Any], data: Prepared
) -> dict[str, Any]:
    """The Fisher diagonal of one split in this process (``stats.fisher_backend: local``),
    saved under the same identity as the sharded result (sampled labels are keyed by sample
    id, so the values are the same)."""
    model = load_model(weights["path"], params.model, data)
    ids = split_ids(params, "fisher", split)
    X, y = data.subset(ids)
    f = params.fisher
    t0 = time.perf_counter()
    tensors = fisher_diagonal(
        model,
        torch.from_numpy(X),
        torch.from_numpy(y),
        kind=f.kind,
        batch_size=f.batch_size,
        seed=f.seed,
        sample_ids=list(ids),
    )
    seconds = time.perf_counter() - t0
    identity = stats_identity(
        "fisher", split, weights["digest"], data.content_hash, ids, fisher_options(f)
    )
    extra = {
        "weights_digest": weights["digest"],
        "data_content_hash": data.content_hash,
        "backend": "local",
        "seconds": seconds,
    }
    path, digest = _save(params, "fisher", split, identity, tensors, extra)
    return {"path": path, "digest": digest, "n": len(ids), "seconds": seconds, "reused": False}


def lookup(params: Params, identity: dict[str, Any]) -> dict | None:
    """The stored statistic of ``identity`` (:func:`identity_for`), or None
    (:func:`find_stats`)."""
    found = find_stats(params.resolve(params.stats.out_dir), identity)
    if found is None:
        return None
    path, _, meta = found
    cfg = meta["config"]
    return {
        "path": str(path),
        "digest": meta["digest"],
        "n": identity["n"],
        "seconds": float(cfg.get("seconds", 0.0)),
        "shards": int(cfg.get("n_shards", 1)),
        "reused": True,
        "identity": identity,
    }


@task(name="fisher-statistics")
def fisher_statistics(params: Params, weights: dict[str, Any]) -> dict[str, Any]:
    """I_F and I_R of the original model for the pipeline: looked up in ``stats.out_dir``
    (written by ``unlearn stats fisher`` or an earlier run, for any method that needs them),
    else computed with ``stats.fisher_backend`` and stored there. ``seconds`` is what the
    statistics cost to compute, whether now or when they were stored."""
    logger = get_run_logger()
    data = load_prepared(params.resolve(params.data.out_dir))
    out: dict[str, Any] = {}
    for split in ("forget", "retain"):
        identity = identity_for(params, "fisher", split, weights["digest"], data.content_hash)
        res = lookup(params, identity)
        if res is None:
            if params.stats.fisher_backend == "ray":
                shards = shard_split.fn(params, "fisher", split)
                res = sharded_statistics.fn(params, "fisher", split, shards, weights)
            else:
                res = local_fisher(params, split, weights, data)
        logger.info(
            "Fisher %s (%d samples): %s %s",
            split,
            res["n"],
            "reused" if res["reused"] else f"computed ({params.stats.fisher_backend})",
            res["path"],
        )
        out.update(
            {
                f"{split}_path": res["path"],
                f"{split}_digest": res["digest"],
                f"{split}_reused": res["reused"],
                f"n_{split}": res["n"],
                f"{split}_seconds": res["seconds"],
            }
        )
    out["seconds"] = out["forget_seconds"] + out["retain_seconds"]
    return out
