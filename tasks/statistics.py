"""Prefect tasks of the statistics store: find a statistic of a model by its identity, or
compute it (Fisher diagonals locally or sharded on Ray; activation Gram matrices on Ray) and
store it under that identity. The ``statistics`` flow and the unlearning pipeline share them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger, get_run_logger

from pipeline_lib.config import FisherConfig, Params, to_dict
from pipeline_lib.data.images import Prepared, load_prepared
from pipeline_lib.data.requests import load_manifests
from pipeline_lib.io import load_weights, pid_alive
from pipeline_lib.modalities.image import (
    fisher_config,
    fisher_split_ids,
    load_model,
    model_threads,
)
from pipeline_lib.stats.fisher import PER_SAMPLE_KINDS, fisher_diagonal, fisher_diagonal_sum
from pipeline_lib.stats.store import (
    find_stats,
    load_stats,
    means,
    reduce_sums,
    retain_from_full,
    save_stats,
    stats_identity,
    stats_path,
    write_shards,
)
from tasks import stats as ray_stats

STATISTICS = ("fisher", "activations")
log = get_logger("unlearnflow.statistics")


def split_ids(params: Params, statistic: str, split: str) -> np.ndarray:
    """The ids a statistic is computed over: for ``fisher`` exactly the pipeline's I_F / I_R
    samples (``fisher.max_retain`` applies); for ``activations`` the whole split."""
    man = load_manifests(params.resolve(params.request.out_dir))
    if statistic == "fisher":
        return fisher_split_ids(man, split, params.fisher)
    if split not in ("forget", "retain"):
        raise ValueError(f"split {split!r} unknown; valid: forget, retain")
    return man.forget_ids if split == "forget" else man.retain_ids


_SHARD_DIR = re.compile(r"^\.?(?P<name>[a-z]+)-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _alive(host: str, pid: int) -> bool:
    """Whether the process that wrote a shard directory may still be using it (another host's
    processes cannot be checked: assumed alive)."""
    return host != _host() or pid_alive(pid)


def sweep_shards(root: Path) -> list[Path]:
    """Remove shard directories under ``root`` whose writer is gone (killed before its clean-up)
    and those of older versions, which kept shards named by their data; returns them."""
    removed = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        m = _SHARD_DIR.match(entry.name)
        if m and _alive(m["host"], int(m["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        removed.append(entry)
    if removed:
        log.warning("removed %d stale shard directories under %s", len(removed), root)
    return removed


@contextlib.contextmanager
def temporary_shards(
    params: Params, name: str, ids: np.ndarray, X: np.ndarray, y: np.ndarray
) -> Iterator[list[str]]:
    """Parquet shards of (ids, X, y) for one computation, deleted when it ends, whether it
    succeeds or fails: no copy of a split's rows (forgotten ones included) outlives it. They
    live under ``stats.out_dir/shards/<name>-<host>-<pid>-<random>`` (so Ray workers on other
    nodes read them from shared storage); a directory left by a killed run is removed by the
    next one (:func:`sweep_shards`)."""
    root = params.resolve(params.stats.out_dir) / "shards"
    sweep_shards(root)
    out = root / f"{name}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield [str(p) for p in write_shards(ids, X, y, out, params.stats.n_shards)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when no other run has shards there


@contextlib.contextmanager
def split_shards(params: Params, statistic: str, split: str) -> Iterator[list[str]]:
    """The split's rows as temporary Parquet shards (:func:`temporary_shards`)."""
    data = load_prepared(params.resolve(params.data.out_dir))
    ids = split_ids(params, statistic, split)
    X, y = data.subset(ids)
    with temporary_shards(params, split, ids, X, y) as shards:
        yield shards


def identity_for(
    params: Params, statistic: str, split: str, weights_digest: str, content_hash: str
) -> dict[str, Any]:
    """The identity (:func:`pipeline_lib.stats.store.stats_identity`) of a statistic of the model
    with ``weights_digest`` on this request's split."""
    ids = split_ids(params, statistic, split)
    options = fisher_options(params.fisher) if statistic == "fisher" else {}
    return stats_identity(statistic, split, weights_digest, content_hash, ids, options)


def fisher_options(cfg: FisherConfig) -> dict[str, Any]:
    """The Fisher settings that change its values (``max_retain`` acts through the ids;
    the batch size only for ``batch_squared``, whose batches are the statistic)."""
    extra = {"batch_size": cfg.batch_size} if cfg.kind not in PER_SAMPLE_KINDS else {}
    return {"kind": cfg.kind, "seed": cfg.seed, "dtype": "float32", **extra}


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
    Gram matrix. The activations of the retain split come from the model's full-data Gram
    sums instead (G_R = G_D − G_F, no shards) when :func:`activation_retain_source` says so."""
    data = load_prepared(params.resolve(params.data.out_dir))
    if statistic == "activations" and split == "retain":
        mode = activation_retain_source(params, weights["digest"], data.content_hash)
        if mode == "full_minus_forget":
            return activations_from_full(params, weights, data)
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
    ids = split_ids(params, "fisher", split)
    tensors, seconds = _fisher_here(params, weights, data, ids, fisher_diagonal)
    identity = stats_identity(
        "fisher", split, weights["digest"], data.content_hash, ids, fisher_options(params.fisher)
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


# --------------------------------------------------------------------------- full-data sums


def full_split_ids(params: Params) -> np.ndarray:
    """D of a request, sorted: its forget and retain ids together, i.e. the train split less
    the tombstones at the time (the training set of the model version it unlearns from)."""
    man = load_manifests(params.resolve(params.request.out_dir))
    return np.sort(np.concatenate([man.forget_ids, man.retain_ids]))


def full_identity(
    params: Params, weights_digest: str, content_hash: str, ids: np.ndarray
) -> dict[str, Any]:
    """Identity of a model version's full-data Fisher *sums* Σ_D over ``ids`` (sorted)."""
    options = {**fisher_options(params.fisher), "reduction": "sum", "sum_dtype": "float64"}
    return stats_identity("fisher", "full", weights_digest, content_hash, list(ids), options)


def _local_sums(
    params: Params, weights: dict[str, Any], data: Prepared, ids: np.ndarray
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Float64 Fisher sums over ``ids`` in this process: (sums, n, seconds)."""
    (sums, n), seconds = _fisher_here(
        params, weights, data, ids, fisher_diagonal_sum, sum_dtype=torch.float64
    )
    return sums, n, seconds


def _fisher_here(
    params: Params,
    weights: dict[str, Any],
    data: Prepared,
    ids: np.ndarray,
    fn: Callable[..., Any],
    **extra: Any,
) -> tuple[Any, float]:
    """``fn`` (a Fisher function of pipeline_lib.stats.fisher) of the version's model over
    ``ids`` in this process, under ``train.threads``: (its result, seconds)."""
    f = params.fisher
    model = load_model(weights["path"], params.model, data)
    X, y = data.subset(ids)
    with model_threads(params.train, params.model, data):
        t0 = time.perf_counter()
        out = fn(
            model,
            torch.from_numpy(X),
            torch.from_numpy(y),
            kind=f.kind,
            batch_size=f.batch_size,
            seed=f.seed,
            sample_ids=list(ids),
            **extra,
        )
        return out, time.perf_counter() - t0


def _store_full(
    params: Params, identity: dict[str, Any], tensors, config: dict, n: int, seconds: float
) -> dict[str, Any]:
    """Store full-data sums under ``identity`` (atomic) and describe them as :func:`lookup`."""
    path = stats_path(params.resolve(params.stats.out_dir), identity)
    digest = save_stats(tensors, path, config)
    return {
        "path": str(path),
        "digest": digest,
        "n": n,
        "seconds": seconds,
        "reused": False,
        "identity": identity,
    }


def full_fisher_sums(
    params: Params, weights: dict[str, Any], ids: np.ndarray | None = None
) -> dict[str, Any]:
    """Σ_D and N of the model ``weights`` over ``ids`` (default: the request's D,
    :func:`full_split_ids`), found in the statistics store or computed (float64 sums,
    ``stats.fisher_backend``) and stored under :func:`full_identity`. ``seconds``: what the
    sums cost to compute (the amortised statistics cost of the version)."""
    data = load_prepared(params.resolve(params.data.out_dir))
    ids = np.sort(np.asarray(full_split_ids(params) if ids is None else ids, dtype=str))
    identity = full_identity(params, weights["digest"], data.content_hash, ids)
    found = lookup(params, identity)
    if found is not None:
        return found
    f = params.fisher
    if f.kind not in PER_SAMPLE_KINDS:
        raise ValueError(f"full-data Fisher sums need a per-sample fisher.kind, not {f.kind!r}")
    if params.stats.fisher_backend == "ray":
        X, y = data.subset(ids)
        with temporary_shards(params, "full", ids, X, y) as shards:
            t0 = time.perf_counter()
            run = ray_stats.run_shards(
                "fisher",
                load_weights(weights["path"]),
                to_dict(params.model),
                data.shape,
                data.n_classes,
                shards,
                {"kind": f.kind, "batch_size": f.batch_size, "seed": f.seed},
                params.ray,
                params.stats.workers,
            )
        # shard sums are float32; their reduce is float64
        parts = [({k: v.double() for k, v in s_.items()}, n) for s_, n in run["parts"]]
        sums, n = reduce_sums(parts)
        seconds, backend = time.perf_counter() - t0, "ray"
    else:
        sums, n, seconds = _local_sums(params, weights, data, ids)
        backend = "local"
    config = fisher_config(
        f,
        "full",
        n,
        reduction="sum",
        weights_digest=weights["digest"],
        data_content_hash=data.content_hash,
        backend=backend,
        seconds=seconds,
        identity=identity,
    )
    return _store_full(params, identity, sums, config, n, seconds)


@task(name="full-data-statistics", cache_policy=NO_CACHE)
def full_data_statistics(
    params: Params, weights: dict[str, Any], ids: list[str] | None = None
) -> dict[str, Any]:
    """The full-data Fisher sums of a model version (:func:`full_fisher_sums`): computed once
    per version, off a request's own path (the service calls it right after registering a
    version), so that each later request computes only its forget set."""
    res = full_fisher_sums(params, weights, None if ids is None else np.asarray(ids, dtype=str))
    get_run_logger().info(
        "full-data Fisher sums of %s (%d samples): %s in %.2fs -> %s",
        weights["digest"][:12],
        res["n"],
        "reused" if res["reused"] else "computed",
        res["seconds"],
        res["path"],
    )
    return res


def retain_source(params: Params, weights_digest: str, content_hash: str) -> str:
    """``direct`` or ``full_minus_forget`` for this request (``stats.retain_from``; null:
    full_minus_forget when the model's full-data sums are stored and apply)."""
    f, chosen = params.fisher, params.stats.retain_from
    man = load_manifests(params.resolve(params.request.out_dir))
    subsampled = f.max_retain is not None and f.max_retain < len(man.retain_ids)
    if chosen == "full_minus_forget":
        if f.kind not in PER_SAMPLE_KINDS:
            raise ValueError(
                f"stats.retain_from full_minus_forget needs a per-sample fisher.kind "
                f"({', '.join(PER_SAMPLE_KINDS)}), not {f.kind!r}"
            )
        return chosen
    if chosen == "direct" or f.kind not in PER_SAMPLE_KINDS or subsampled:
        return "direct"
    ids = full_split_ids(params)
    stored = stats_path(
        params.resolve(params.stats.out_dir),
        full_identity(params, weights_digest, content_hash, ids),
    ).is_file()
    return "full_minus_forget" if stored else "direct"


def _entries(split: str, res: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{split}_path": res["path"],
        f"{split}_digest": res["digest"],
        f"{split}_reused": res["reused"],
        f"n_{split}": res["n"],
        f"{split}_seconds": res["seconds"],
    }


def _fisher_from_full(
    params: Params, weights: dict[str, Any], data: Prepared, logger: Any
) -> dict[str, Any]:
    """I_F computed, I_R = (Σ_D − Σ_F)/(N − |F|) from the version's full-data sums."""
    f = params.fisher
    man = load_manifests(params.resolve(params.request.out_dir))
    fid = identity_for(params, "fisher", "forget", weights["digest"], data.content_hash)
    rid = stats_identity(
        "fisher",
        "retain",
        weights["digest"],
        data.content_hash,
        list(man.retain_ids),
        {**fisher_options(f), "retain_from": "full_minus_forget"},
    )
    full = full_fisher_sums(params, weights)
    res_f, res_r = lookup(params, fid), lookup(params, rid)
    if res_r is None:
        sums_f, n_f, forget_seconds = _local_sums(params, weights, data, man.forget_ids)
        common = {"weights_digest": weights["digest"], "data_content_hash": data.content_hash}
        if res_f is None:
            tensors = {k: (v / n_f).float() for k, v in sums_f.items()}
            extra = {**common, "backend": "local", "seconds": forget_seconds}
            path, digest = _save(params, "fisher", "forget", fid, tensors, extra)
            res_f = {"path": path, "digest": digest, "n": n_f, "reused": False}
        res_f["seconds"] = forget_seconds
        t0 = time.perf_counter()
        full_sums, _ = load_stats(full["path"])
        i_r = {k: v.float() for k, v in retain_from_full(full_sums, full["n"], sums_f, n_f).items()}
        derive = time.perf_counter() - t0
        extra = {
            **common,
            "backend": "full_minus_forget",
            "full_path": full["path"],
            "full_digest": full["digest"],
            "seconds": derive,
        }
        path, digest = _save(params, "fisher", "retain", rid, i_r, extra)
        res_r = {"path": path, "digest": digest, "n": len(man.retain_ids), "seconds": derive}
        res_r["reused"] = False
    logger.info(
        "Fisher retain (%d samples) = full-data sums (%d, %s) minus forget (%d): %s",
        res_r["n"],
        full["n"],
        "stored" if full["reused"] else "computed now",
        res_f["n"],
        res_r["path"],
    )
    out = {**_entries("forget", res_f), **_entries("retain", res_r)}
    n_full = full["n"]
    out.update(
        retain_from="full_minus_forget",
        full_path=full["path"],
        full_reused=full["reused"],
        n_full=n_full,
        amortised_seconds=full["seconds"],
        # what computing I_R over R directly would cost: the same per-sample work on |R| of N
        direct_retain_seconds=full["seconds"] * res_r["n"] / max(n_full, 1),
    )
    return out


@task(name="fisher-statistics")
def fisher_statistics(params: Params, weights: dict[str, Any]) -> dict[str, Any]:
    """I_F and I_R of the original model for the pipeline: looked up in ``stats.out_dir``
    (written by ``unlearn stats fisher`` or an earlier run, for any method that needs them),
    else computed with ``stats.fisher_backend`` and stored there. ``stats.retain_from``
    decides whether I_R is computed over R (``direct``) or derived from the model's full-data
    sums (``full_minus_forget``: only F is computed per request).

    ``seconds`` is the request's own statistics cost (what the statistics cost to compute,
    whether now or when they were stored): I_F and I_R, or I_F and the subtraction.
    ``amortised_seconds``: the full-data sums' cost (0 for ``direct``);
    ``direct_retain_seconds``: what I_R over R costs (measured, or for ``full_minus_forget``
    estimated as the full-data cost × |R|/N)."""
    logger = get_run_logger()
    data = load_prepared(params.resolve(params.data.out_dir))
    mode = retain_source(params, weights["digest"], data.content_hash)
    if mode == "full_minus_forget":
        out = _fisher_from_full(params, weights, data, logger)
        out["seconds"] = out["forget_seconds"] + out["retain_seconds"]
        return out
    out: dict[str, Any] = {}
    for split in ("forget", "retain"):
        identity = identity_for(params, "fisher", split, weights["digest"], data.content_hash)
        res = lookup(params, identity)
        if res is None:
            if params.stats.fisher_backend == "ray":
                with split_shards(params, "fisher", split) as shards:
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
        out.update(_entries(split, res))
    out["seconds"] = out["forget_seconds"] + out["retain_seconds"]
    out.update(retain_from="direct", amortised_seconds=0.0)
    out["direct_retain_seconds"] = out["retain_seconds"]
    return out


# --------------------------------------------------------------------------- activation Grams


def full_activation_identity(
    weights_digest: str, content_hash: str, ids: np.ndarray
) -> dict[str, Any]:
    """Identity of a model version's full-data activation Gram *sums* G_D over ``ids``
    (sorted): Σ AᵀA per projected layer, float64, the model computing in float32."""
    options = {"dtype": "float32", "reduction": "sum", "sum_dtype": "float64"}
    return stats_identity("activations", "full", weights_digest, content_hash, list(ids), options)


def _local_grams(
    params: Params, weights: dict[str, Any], data: Prepared, ids: np.ndarray
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Float64 Gram sums over ``ids`` in this process (one forward pass): (grams, n, seconds)."""
    from pipeline_lib.stats.activations import activation_grams

    model = load_model(weights["path"], params.model, data)
    X, _ = data.subset(ids)
    t0 = time.perf_counter()
    grams, n = activation_grams(
        model, torch.from_numpy(X), params.stats.batch_size, dtype=torch.float64
    )
    return grams, n, time.perf_counter() - t0


def full_activation_grams(
    params: Params, weights: dict[str, Any], ids: np.ndarray | None = None
) -> dict[str, Any]:
    """G_D and N of the model ``weights`` over ``ids`` (default: the request's D,
    :func:`full_split_ids`), found in the statistics store or computed in this process (one
    forward pass over D; the Gram sums are float64) and stored under
    :func:`full_activation_identity`. ``seconds``: what computing them cost."""
    data = load_prepared(params.resolve(params.data.out_dir))
    ids = np.sort(np.asarray(full_split_ids(params) if ids is None else ids, dtype=str))
    identity = full_activation_identity(weights["digest"], data.content_hash, ids)
    found = lookup(params, identity)
    if found is not None:
        return found
    grams, n, seconds = _local_grams(params, weights, data, ids)
    config = {
        "statistic": "activations",
        "split": "full",
        "n": n,
        "reduction": "sum",
        "weights_digest": weights["digest"],
        "data_content_hash": data.content_hash,
        "backend": "local",
        "seconds": seconds,
        "identity": identity,
    }
    return _store_full(params, identity, grams, config, n, seconds)


def activation_retain_source(params: Params, weights_digest: str, content_hash: str) -> str:
    """``direct`` (shards over R) or ``full_minus_forget`` (G_R = G_D − G_F) for the retain
    activations of this request (``stats.retain_from``; null: full_minus_forget when the
    model's full-data Gram sums are stored)."""
    chosen = params.stats.retain_from
    if chosen is not None:
        return chosen
    stored = stats_path(
        params.resolve(params.stats.out_dir),
        full_activation_identity(weights_digest, content_hash, full_split_ids(params)),
    ).is_file()
    return "full_minus_forget" if stored else "direct"


def activations_from_full(
    params: Params, weights: dict[str, Any], data: Prepared
) -> dict[str, Any]:
    """The retain split's activation basis (``<layer>.U``, ``<layer>.S``) from G_R = G_D − G_F:
    G_D found or computed (:func:`full_activation_grams`), G_F computed (|F| samples), saved
    under the same identity as the sharded result over R (:func:`identity_for`: the same
    statistic, exact for sums), its config naming the derivation. ``seconds``: the request's
    own cost (G_F, the subtraction and the decomposition); ``amortised_seconds``: G_D's."""
    from pipeline_lib.stats.activations import decompose_grams, retain_grams_from_full

    man = load_manifests(params.resolve(params.request.out_dir))
    full = full_activation_grams(params, weights)
    g_f, n_f, forget_seconds = _local_grams(params, weights, data, man.forget_ids)
    t0 = time.perf_counter()
    g_d, _ = load_stats(full["path"])
    g_r, n_r = retain_grams_from_full(g_d, full["n"], g_f, n_f)
    tensors = decompose_grams(g_r)
    seconds = forget_seconds + time.perf_counter() - t0
    identity = identity_for(params, "activations", "retain", weights["digest"], data.content_hash)
    if identity["n"] != n_r:
        raise RuntimeError(
            f"activations of retain: G_D − G_F holds {n_r}, expected {identity['n']}"
        )
    extra = {
        "weights_digest": weights["digest"],
        "data_content_hash": data.content_hash,
        "backend": "full_minus_forget",
        "full_path": full["path"],
        "full_digest": full["digest"],
        "seconds": seconds,
    }
    path, digest = _save(params, "activations", "retain", identity, tensors, extra)
    return {
        "path": path,
        "digest": digest,
        "n": n_r,
        "shards": 0,
        "seconds": seconds,
        "wall_seconds": seconds,
        "samples_per_second": n_f / seconds if seconds > 0 else float("nan"),
        "workers": 1,
        "nodes": 1,
        "reused": False,
        "identity": identity,
        "retain_from": "full_minus_forget",
        "full_reused": full["reused"],
        "amortised_seconds": full["seconds"],
    }
