"""Ray edge of the sharded statistics: one ``ray.remote`` task per Parquet shard computes
that shard's partial sums (:mod:`pipeline_lib.stats.store`, :mod:`pipeline_lib.stats.activations`); the
driver reduces them in shard order.

Connection as for the attribution store (:func:`tasks.attribution.connect`: a local Ray, or
``ray.address`` / ``RAY_ADDRESS``). Each task runs torch with as many threads as the CPUs it
declares (``ray.cpus_per_task``), on CUDA when it asks for GPUs (``ray.gpus_per_task``,
:mod:`tasks.ray_resources`). Shards are read by path, so on a multi-node cluster the
stats directory must be on storage every node sees.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline_lib.config import ModelConfig, RayConfig, parse_section
from pipeline_lib.models.image import build_model
from tasks.attribution import connect
from tasks.ray_resources import check_gpus, task_device, task_options, task_slots

__all__ = ["connect", "run_shards"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@ray.remote
def _shard_remote(
    kind: str,
    state: dict[str, torch.Tensor],
    model_cfg: dict[str, Any],
    shape: tuple[int, ...],
    n_classes: int,
    shard: str,
    options: dict[str, Any],
    threads: int,
    gpus: float = 0.0,
    tf32: bool = False,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    device = task_device(gpus, tf32)
    t0 = time.perf_counter()
    dtype = DTYPES[options.get("dtype", "float32")]
    # cast before loading so float64 weights stay float64
    model = build_model(parse_section(ModelConfig, model_cfg), shape, n_classes, seed=0).to(dtype)
    model.load_state_dict(state)
    model.to(device)
    model.eval()
    if kind == "fisher":
        from pipeline_lib.stats.store import fisher_shard_sums

        sums, n = fisher_shard_sums(
            model, shard, options["kind"], options["batch_size"], options["seed"], dtype
        )
    elif kind == "activations":
        from pipeline_lib.stats.activations import activation_shard_grams

        sums, n = activation_shard_grams(model, shard, options["batch_size"], dtype)
    else:
        raise ValueError(f"unknown statistic {kind!r}; valid: fisher, activations")
    return {
        "sums": {k: v.cpu() for k, v in sums.items()},
        "n": n,
        "seconds": time.perf_counter() - t0,
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def run_shards(
    kind: str,
    state: dict[str, torch.Tensor],
    model_cfg: dict[str, Any],
    shape: Sequence[int],
    n_classes: int,
    shards: Sequence[str | Path],
    options: dict[str, Any],
    cfg: RayConfig,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run one task per shard with at most ``workers`` in flight (default: every CPU slot);
    returns ``parts`` (list of (sums, n) in shard order) and timing."""
    connect(cfg)
    check_gpus(cfg)
    slots = task_slots(cfg)
    limit = workers or slots
    state_ref = ray.put({k: v.detach().cpu() for k, v in state.items()})
    remote = _shard_remote.options(**task_options(cfg))
    queue = list(enumerate(shards))
    in_flight: dict[Any, int] = {}
    results: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            i, shard = queue.pop(0)
            ref = remote.remote(
                kind,
                state_ref,
                model_cfg,
                tuple(shape),
                n_classes,
                str(shard),
                options,
                cfg.cpus_per_task,
                cfg.gpus_per_task,
                cfg.tf32,
            )
            in_flight[ref] = i
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            results[in_flight.pop(ref)] = ray.get(ref)
    wall = time.perf_counter() - t0
    ordered = [results[i] for i in range(len(shards))]
    n = sum(r["n"] for r in ordered)
    return {
        "parts": [(r["sums"], r["n"]) for r in ordered],
        "n": n,
        "wall_seconds": wall,
        "samples_per_second": n / wall if wall > 0 else float("inf"),
        "task_seconds": [r["seconds"] for r in ordered],
        "workers": limit,
        "nodes": sorted({r["node_id"] for r in ordered}),
    }
