"""The ``statistics`` flow behind ``unlearn stats fisher|activations --split retain|forget``.

prepare + extract (the same DVC stages as the unlearning pipeline) → the original model (the
same cached training task, so a pipeline run's model is reused) → the split written as
temporary Parquet shards → one ``ray.remote`` task per shard (partial sums) → reduce in shard
order → a safetensors file with the statistics, their config and content hash, written
atomically under ``stats.out_dir``. The shards are deleted once the statistic is reduced, also
when it fails: no copy of the split's rows (forgotten ones included) stays behind.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from pipeline_lib.config import environment_overrides, load_params, to_dict
from pipeline_lib.data.images import load_prepared
from pipeline_lib.data.requests import load_request
from pipeline_lib.io import code_version
from pipeline_lib.modalities import get_modality
from tasks import compute, tracking, versioning
from tasks.compute import with_files
from tasks.statistics import STATISTICS, identity_for, lookup, sharded_statistics, split_shards


@flow(name="statistics")
def statistics_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    statistic: str = "fisher",
    split: str = "retain",
    force: bool = False,
) -> dict[str, Any]:
    """Compute one sharded statistic of the original model on a request's split, or find
    it already stored under its identity (``force``: recompute and replace it). Logs an
    MLflow run ``stats-<statistic>-<split>-<request id>``."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r} unknown; valid: {', '.join(STATISTICS)}")
    params = load_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    request = load_request(str(params.resolve(params.request.file)))
    params, staged = versioning.stage_data(get_modality("image"), params, request)
    data = {k: staged[k] for k in ("prepared_dir", "prepared_md5")}
    cfg = to_dict(params)
    original = with_files(
        compute.train_model,
        ("path",),
        "image",
        data,
        "original",
        get_modality("image").train_sections(cfg),
        params.train.seed,
        str(params.resolve(params.tracking.artifacts_dir)),
        code_version(),
    )
    content_hash = load_prepared(params.resolve(params.data.out_dir)).content_hash
    identity = identity_for(params, statistic, split, original["digest"], content_hash)
    result = None if force else lookup(params, identity)
    if result is None:
        with split_shards(params, statistic, split) as shards:
            result = sharded_statistics(params, statistic, split, shards, original)
    if result["reused"]:
        get_run_logger().info(
            "%s statistics of %s (%d samples) found, not recomputed: %s",
            statistic,
            split,
            result["n"],
            result["path"],
        )
    else:
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
    result["mlflow_run_id"] = tracking.log_statistics(
        params.tracking.mlflow_uri,
        params.tracking.experiment,
        request.request_id,
        {**result, "statistic": statistic, "split": split},
        staged,
    )
    return {**result, "request_id": request.request_id, "split": split, "statistic": statistic}
