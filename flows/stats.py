"""The ``statistics`` flow behind ``unlearn stats fisher|activations --split retain|forget``.

prepare + extract (the same DVC stages as the unlearning pipeline) → the original model (the
same cached training task, so a pipeline run's model is reused) → the split written as
Parquet shards → one ``ray.remote`` task per shard (partial sums) → reduce in shard order →
a safetensors file with the statistics, their config and content hash, written atomically
under ``stats.out_dir``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
from prefect import flow, task
from prefect.logging import get_run_logger

from pipeline_lib.config import FisherConfig, Params, environment_overrides, load_params, to_dict
from pipeline_lib.data import load_prepared
from pipeline_lib.io import load_weights, state_dict_digest
from pipeline_lib.requests import load_manifests, load_request
from pipeline_lib.stats import means, reduce_sums, save_stats, write_shards
from pipeline_lib.steps import code_version, fisher_config, fisher_split_ids
from tasks import compute
from tasks import stats as ray_stats

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


@task(name="sharded-statistics")
def sharded_statistics(
    params: Params, statistic: str, split: str, shards: list[str], weights: dict[str, Any]
) -> dict[str, Any]:
    """One Ray task per shard, reduce in shard order, save. Fisher: the means I_S; activations:
    ``<layer>.U`` and ``<layer>.S`` of every layer's Gram matrix."""
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
    sums, n = reduce_sums(run["parts"])
    meta = {
        "weights_digest": weights["digest"],
        "data_content_hash": data.content_hash,
        "n_shards": len(shards),
    }
    if statistic == "fisher":
        tensors = means(sums, n)
        config = fisher_config(params.fisher, split, n, **meta)
    else:
        from pipeline_lib.activations import decompose_grams

        tensors = decompose_grams(sums)
        config = {"statistic": "activations", "split": split, "n": n, **meta}
    digest = state_dict_digest(tensors)
    path = params.resolve(params.stats.out_dir) / f"{statistic}-{split}-{digest[:16]}.safetensors"
    save_stats(tensors, path, config)  # atomic; metadata: config and this content hash
    return {
        "path": str(path),
        "digest": digest,
        "n": n,
        "shards": len(shards),
        "wall_seconds": run["wall_seconds"],
        "samples_per_second": run["samples_per_second"],
        "workers": run["workers"],
        "nodes": run["nodes"],
    }


@flow(name="statistics")
def statistics_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    statistic: str = "fisher",
    split: str = "retain",
) -> dict[str, Any]:
    """Compute one sharded statistic of the original model on a request's split."""
    from flows.pipeline import _with_files, stage_data

    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r} unknown; valid: {', '.join(STATISTICS)}")
    params = load_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    request = load_request(str(params.resolve(params.request.file)))
    params, md5s = stage_data(params, request)
    data = {
        "prepared_dir": str(params.resolve(params.data.out_dir)),
        "prepared_md5": md5s["prepare"][params.data.out_dir],
    }
    cfg = to_dict(params)
    original = _with_files(
        compute.train_model,
        ("path",),
        data,
        "original",
        cfg["model"],
        cfg["train"],
        params.train.seed,
        str(params.resolve(params.tracking.artifacts_dir)),
        code_version(),
    )
    shards = shard_split(params, statistic, split)
    result = sharded_statistics(params, statistic, split, shards, original)
    get_run_logger().info(
        "%s statistics of %s (%d samples, %d shards, %d workers) in %.2fs -> %s",
        statistic,
        split,
        result["n"],
        result["shards"],
        result["workers"],
        result["wall_seconds"],
        result["path"],
    )
    return {**result, "request_id": request.request_id, "split": split, "statistic": statistic}
