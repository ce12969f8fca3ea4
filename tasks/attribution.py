"""Ray edge of the many-model engine: each chunk of model ids is one ``ray.remote`` task
that runs the vectorised ensemble trainer with torch threads matched to its CPUs.

Works with a local ``ray.init()`` and, unchanged, with an existing cluster through
``ray.address`` / ``RAY_ADDRESS``. Chunks come back to the driver through the object store
and the driver writes them into the store (so workers need no shared filesystem); finished
chunks are skipped on re-run, so a crash loses at most the chunks in flight.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from pipeline_lib.attribution.store import AttributionStore, StoreSpec, train_chunk
from tasks import interruption
from tasks.ray_local import init_local
from tasks.ray_resources import check_gpus, task_device, task_options, task_slots

if TYPE_CHECKING:  # each Ray worker imports this module for its chunk task: without the
    # config package (~1 s of imports per worker on the critical path, BENCHMARKS.md issue 17)
    from pipeline_lib.config import RayConfig

log = logging.getLogger(__name__)


def connect(cfg: RayConfig) -> str:
    """Join ``cfg.address`` or ``RAY_ADDRESS`` if given, else start a local Ray. Returns a
    description of where work will run."""
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        # Workers import the installed project (pip install -e . on every node; infra/).
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # on 127.0.0.1 only, token file 0600 (tasks/ray_local.py)
            init_local(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
        # ray.init replaced the SIGTERM handler (sys.exit): the CLI's closes runs as KILLED
        interruption.reinstall()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    return f"{len(nodes)} node(s), {cpus:g} CPU"


@ray.remote
def _train_chunk_remote(
    spec: dict[str, Any],
    start: int,
    stop: int,
    X,
    y,
    targets_X,
    base_mask,
    threads: int,
    gpus: float = 0.0,
    tf32: bool = False,
    cpu_parallel: str = "models",
    cpu_block_mib: float = 8.0,
    conv_kernel: str = "vmap",
):
    import torch

    torch.set_num_threads(threads)
    device = task_device(gpus, tf32)
    t0 = time.perf_counter()
    out = train_chunk(
        StoreSpec(**spec), start, stop, X, y, targets_X, base_mask, device, cpu_parallel,
        cpu_block_mib, conv_kernel,
    )  # fmt: skip
    out["task_seconds"] = time.perf_counter() - t0
    out["node_id"] = ray.get_runtime_context().get_node_id()
    out["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return out


def run_store(
    store: AttributionStore,
    X: np.ndarray,
    y: np.ndarray,
    targets_X: np.ndarray,
    cfg: RayConfig,
    base_mask: np.ndarray | None = None,
    on_chunk: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train every pending chunk of ``store`` on Ray; ``on_chunk(models_done, total, meta)``
    after each chunk is written. Returns timing: wall seconds, models trained, the summed
    trainer seconds, and the fraction of CPU-time not spent inside the trainer."""
    pending = store.pending_chunks()
    total = store.spec.n_models
    done = total - sum(stop - start for start, stop in pending)
    if on_chunk:
        on_chunk(done, total, {})
    if not pending:
        return {"wall_seconds": 0.0, "models_trained": 0, "chunks": [], "overhead_fraction": 0.0}
    check_gpus(cfg)
    spec = asdict(store.spec)
    refs = [ray.put(a) for a in (X, y, targets_X, base_mask)]
    slots = task_slots(cfg)
    remote = _train_chunk_remote.options(**task_options(cfg))
    extra = (
        cfg.cpus_per_task, cfg.gpus_per_task, cfg.tf32, cfg.cpu_parallel, cfg.cpu_block_mib,
        cfg.conv_kernel,
    )  # fmt: skip
    queue = list(pending)
    in_flight: dict[Any, tuple[int, int]] = {}
    chunks = []
    cpu_seconds = 0.0  # the tasks' CPU time inside the trainer
    t0 = time.perf_counter()
    while queue or in_flight:
        while queue and len(in_flight) < 2 * slots:  # keep every slot busy, bound memory
            start, stop = queue.pop(0)
            in_flight[remote.remote(spec, start, stop, *refs, *extra)] = (start, stop)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            in_flight.pop(ref)
            result = ray.get(ref)
            cpu_seconds += result["train_cpu_seconds"]
            meta = store.write_chunk(
                result,
                {
                    "node_id": result["node_id"],
                    "task_seconds": result["task_seconds"],
                    "device": result["device"],
                },
            )
            chunks.append(meta)
            done += result["stop"] - result["start"]
            if on_chunk:
                on_chunk(done, total, meta)
    wall = time.perf_counter() - t0
    trained = sum(c["stop"] - c["start"] for c in chunks)
    parallel = min(slots, len(pending))
    inside = sum(c["train_seconds"] for c in chunks)
    return {
        "wall_seconds": wall,
        "models_trained": trained,
        "models_per_second": trained / wall,
        "chunks": chunks,
        "slots": slots,
        "trainer_seconds": inside,
        "trainer_cpu_seconds": cpu_seconds,
        # CPU-slot time not spent inside the trainer (scheduling, transfer, writing chunks).
        "overhead_fraction": max(0.0, 1.0 - inside / (wall * parallel)),
        "nodes": sorted({c["node_id"] for c in chunks}),
    }
