"""Ray edge of the method comparison: every (original model, method) pair is one
``ray.remote`` task running :func:`pipeline_lib.comparison.unlearn_one` with torch threads
matched to its CPUs; the request's data travels once through the object store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from pipeline_lib.comparison import Problem, unlearn_one
from pipeline_lib.config import (
    FisherConfig,
    ModelConfig,
    RayConfig,
    TrainConfig,
    UnlearnConfig,
    parse_section,
)


@ray.remote
def _unlearn_remote(job: dict[str, Any], problem: Problem, cfg: dict[str, Any], threads: int):
    import torch

    torch.set_num_threads(threads)
    out = unlearn_one(
        job["method"],
        job["state"],
        problem,
        parse_section(ModelConfig, cfg["model"], "model"),
        parse_section(TrainConfig, cfg["train"], "train"),
        parse_section(UnlearnConfig, cfg["unlearn"], "unlearn"),
        parse_section(FisherConfig, cfg["fisher"], "fisher"),
        job["seed"],
        job.get("match"),
        tuple(cfg["mia"]),
    )
    out["model_id"] = job["model_id"]
    return out


@ray.remote
def _retrain_seconds_remote(
    problem: Problem, cfg: dict[str, Any], seed: int, threads: int
) -> float:
    """Seconds to train one model from scratch on R with the single-model trainer — the
    denominator of every 'time ÷ retrain' ratio (what a user would otherwise run)."""
    import torch

    from pipeline_lib.models.image import build_model
    from pipeline_lib.training.fit import FitSettings, fit

    torch.set_num_threads(threads)
    t = parse_section(TrainConfig, cfg["train"], "train")
    model = build_model(
        parse_section(ModelConfig, cfg["model"], "model"),
        tuple(problem.X.shape[1:]),
        problem.n_classes,
        seed,
    )
    r = torch.from_numpy(problem.retain)
    # warm-up on a throwaway model (first-call costs of a fresh worker process), not timed
    warm = build_model(
        parse_section(ModelConfig, cfg["model"], "model"),
        tuple(problem.X.shape[1:]),
        problem.n_classes,
        seed,
    )
    fit(warm, problem.X[r[:128]], problem.y[r[:128]], FitSettings(1, t.batch_size, t.lr), seed)
    t0 = time.perf_counter()
    fit(
        model,
        problem.X[r],
        problem.y[r],
        FitSettings(t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum),
        seed,
    )
    return time.perf_counter() - t0


def run_jobs(
    jobs: Sequence[dict[str, Any]],
    problem: Problem,
    cfg: dict[str, Any],
    ray_cfg: RayConfig,
    on_done: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every job (method, model_id, state, seed, match) on Ray; results in job order."""
    problem_ref = ray.put(problem)
    cfg_ref = ray.put(cfg)
    remote = _unlearn_remote.options(num_cpus=ray_cfg.cpus_per_task)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // ray_cfg.cpus_per_task))
    queue = list(enumerate(jobs))
    in_flight: dict[Any, int] = {}
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    done = 0
    while queue or in_flight:
        while queue and len(in_flight) < 2 * slots:
            i, job = queue.pop(0)
            in_flight[remote.remote(job, problem_ref, cfg_ref, ray_cfg.cpus_per_task)] = i
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            results[in_flight.pop(ref)] = ray.get(ref)
            done += 1
            if on_done:
                on_done(done, len(jobs))
    return results  # type: ignore[return-value]


def retrain_seconds(
    problem: Problem, cfg: dict[str, Any], ray_cfg: RayConfig, seed: int
) -> list[float]:
    """Time single-model retrainings on R, one per CPU slot, all at once: the same
    conditions as the unlearning tasks, which also fill every slot."""
    remote = _retrain_seconds_remote.options(num_cpus=ray_cfg.cpus_per_task)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // ray_cfg.cpus_per_task))
    refs = [remote.remote(problem, cfg, seed + i, ray_cfg.cpus_per_task) for i in range(slots)]
    return [float(s) for s in ray.get(refs)]


def config_payload(params: Any) -> dict[str, Any]:
    """The config sections the remote tasks need, as plain dicts."""
    from pipeline_lib.config import to_dict

    ev = params.evaluate
    return {
        "model": to_dict(params.model),
        "train": to_dict(params.train),
        "unlearn": to_dict(params.unlearn),
        "fisher": to_dict(params.fisher),
        "mia": [ev.mia_svc_c, ev.mia_folds, ev.seed],
    }
