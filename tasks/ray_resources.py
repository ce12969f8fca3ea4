"""What a Ray task of this project asks for (CPUs, GPUs) and where it then computes.

Every ``ray.remote`` job family (attribution, oracle and originals store chunks, statistics
shards, the comparison's unlearning jobs) submits with :func:`task_options` and counts its
slots with :func:`task_slots`; inside the task :func:`task_device` turns the request into a
torch device. ``ray.gpus_per_task: 0`` (the default) asks for no GPU and computes on the
CPU exactly as before.

With ``gpus_per_task > 0`` Ray sets ``CUDA_VISIBLE_DEVICES`` for each task to the card(s) it
was given, so ``cuda`` inside the task is that card; a fraction lets several tasks share a
card (Ray only books the fraction: the tasks must fit in the card's memory together).
:func:`check_gpus` refuses, before any work, a cluster with no (or too small) GPUs, where Ray
would otherwise leave the tasks pending forever; :func:`task_device` refuses a task whose
torch sees no CUDA device (a CPU-only torch build, or a GPU declared to Ray by hand).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import ray

from pipeline_lib.schema import ConfigError

if TYPE_CHECKING:  # not at run time: a Ray worker importing this module skips the config
    # package and everything it registers (~1 s per worker, BENCHMARKS.md issue 17)
    from pipeline_lib.config import RayConfig

__all__ = ["CudaUnavailable", "check_gpus", "task_device", "task_options", "task_slots"]


class CudaUnavailable(RuntimeError):
    """A task was given GPUs by Ray (``ray.gpus_per_task > 0``) but torch sees no CUDA."""


def task_options(cfg: RayConfig) -> dict[str, Any]:
    """``.options(...)`` of a task: its CPUs and, when asked for, its (fraction of) GPUs."""
    opts: dict[str, Any] = {"num_cpus": cfg.cpus_per_task}
    if cfg.gpus_per_task > 0:
        opts["num_gpus"] = cfg.gpus_per_task
    return opts


def task_slots(cfg: RayConfig) -> int:
    """How many such tasks the cluster runs at once: its CPUs ÷ ``cpus_per_task`` and, for
    GPU tasks, at most its GPUs ÷ ``gpus_per_task`` (at least 1)."""
    res = ray.cluster_resources()
    slots = int(res.get("CPU", 1) // cfg.cpus_per_task)
    if cfg.gpus_per_task > 0:
        # 1e-9: 3 × (1/3) must count as 3 slots despite float rounding
        slots = min(slots, math.floor(res.get("GPU", 0.0) / cfg.gpus_per_task + 1e-9))
    return max(1, slots)


def check_gpus(cfg: RayConfig) -> None:
    """Refuse GPU tasks on a cluster that cannot run them (call after connecting).

    Raises ConfigError naming ``ray.gpus_per_task`` when no alive node offers that many GPUs
    (Ray would otherwise keep the tasks pending, with only a warning in its logs).
    """
    if cfg.gpus_per_task <= 0:
        return
    per_node = [
        float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")
    ]
    best = max(per_node, default=0.0)
    if best < cfg.gpus_per_task:
        where = "no GPU" if best == 0 else f"at most {best:g} GPU(s) on one node"
        raise ConfigError(
            f"ray.gpus_per_task: is {cfg.gpus_per_task:g} but the Ray cluster has {where} "
            f"({len(per_node)} node(s)); set ray.gpus_per_task: 0 to train on CPUs, or join a "
            "cluster whose nodes declare GPUs",
            key="ray.gpus_per_task",
        )


def task_device(gpus_per_task: float, tf32: bool = False) -> Any:
    """Inside a task: the torch device its request entitles it to (CPU when it asked for no
    GPU), with the float32 precision settings of ``ray.tf32`` applied on CUDA.

    Raises CudaUnavailable when the task was given GPUs but torch cannot use CUDA.
    """
    import torch

    if gpus_per_task <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        import os

        raise CudaUnavailable(
            f"ray.gpus_per_task is {gpus_per_task:g} and Ray gave this task GPU(s) "
            f"{ray.get_gpu_ids()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}), "
            f"but torch {torch.__version__} on node {ray.get_runtime_context().get_node_id()[:12]} "
            "sees no CUDA device: install a CUDA build of torch on the workers, or set "
            "ray.gpus_per_task: 0"
        )
    # TF32 off also for cuDNN, whose default is on: full float32 unless ray.tf32 says otherwise
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.device("cuda")
