"""Ray edge of the method comparison: every (original model, method) pair is one
``ray.remote`` task running :func:`pipeline_lib.comparison.unlearn_one` with torch threads
matched to its CPUs; the request's data travels once through the object store. Also the
steps the comparison and the tuning flows share: the request's :class:`Problem` in the
stores' target order and the matching targets of DMM / OM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from pipeline_lib.attribution.matching import (
    MatchTargets,
    datamodel_targets,
    full_model_anchor,
    matching_retain_rows,
    oracle_targets,
)
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.comparison import Problem, unlearn_one
from pipeline_lib.config import (
    FisherConfig,
    ModelConfig,
    RayConfig,
    TrainConfig,
    UnlearnConfig,
    parse_section,
)
from pipeline_lib.data.images import load_prepared
from pipeline_lib.data.requests import load_manifests, load_request
from pipeline_lib.methods.matching import datamodel_settings
from tasks.ray_resources import check_gpus, task_device, task_options, task_slots


@ray.remote
def _unlearn_remote(
    job: dict[str, Any],
    problem: Problem,
    cfg: dict[str, Any],
    threads: int,
    gpus: float = 0.0,
    tf32: bool = False,
):
    import torch

    torch.set_num_threads(threads)
    device = task_device(gpus, tf32)
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
        device=device,
    )
    out["model_id"] = job["model_id"]
    return out


@ray.remote
def _retrain_seconds_remote(
    problem: Problem,
    cfg: dict[str, Any],
    seed: int,
    threads: int,
    gpus: float = 0.0,
    tf32: bool = False,
) -> float:
    """Seconds to train one model from scratch on R with the single-model trainer — the
    denominator of every 'time ÷ retrain' ratio (what a user would otherwise run)."""
    import torch

    from pipeline_lib.models.image import build_model
    from pipeline_lib.training.fit import FitSettings, fit

    torch.set_num_threads(threads)
    device = task_device(gpus, tf32)
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
    fit(
        warm,
        problem.X[r[:128]],
        problem.y[r[:128]],
        FitSettings(1, t.batch_size, t.lr),
        seed,
        device=device,
    )
    t0 = time.perf_counter()
    fit(
        model,
        problem.X[r],
        problem.y[r],
        FitSettings(t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum),
        seed,
        device=device,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
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
    check_gpus(ray_cfg)
    remote = _unlearn_remote.options(**task_options(ray_cfg))
    slots = task_slots(ray_cfg)
    extra = (ray_cfg.cpus_per_task, ray_cfg.gpus_per_task, ray_cfg.tf32)
    queue = list(enumerate(jobs))
    in_flight: dict[Any, int] = {}
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    done = 0
    while queue or in_flight:
        while queue and len(in_flight) < 2 * slots:
            i, job = queue.pop(0)
            in_flight[remote.remote(job, problem_ref, cfg_ref, *extra)] = i
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
    check_gpus(ray_cfg)
    remote = _retrain_seconds_remote.options(**task_options(ray_cfg))
    slots = task_slots(ray_cfg)
    extra = (ray_cfg.cpus_per_task, ray_cfg.gpus_per_task, ray_cfg.tf32)
    refs = [remote.remote(problem, cfg, seed + i, *extra) for i in range(slots)]
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
        "mia": [ev.mia_svc_c, ev.mia_folds, ev.seed, ev.mia_seeds],
    }


def build_problem(store: AttributionStore, prepared_dir: str, manifests_dir: str) -> Problem:
    """The request's points in the stores' target order (train by id, then test)."""
    data = load_prepared(prepared_dir)
    man = load_manifests(manifests_dir)
    targets = store.targets()
    ids = targets.column("sample_id").to_numpy()
    split = np.asarray(targets.column("split").to_pylist())
    X, y = data.subset(ids)
    forget = store.columns_of(np.sort(man.forget_ids))
    retain = store.columns_of(np.sort(man.retain_ids))
    return Problem(
        torch.from_numpy(X),
        torch.from_numpy(y),
        np.sort(forget),
        np.sort(retain),
        np.flatnonzero(split == "test"),
        data.n_classes,
        ids=np.asarray(ids, dtype=str),
    )


@dataclass(frozen=True)
class StagedRequest:
    """The request of a params file, its data and manifests staged by DVC
    (:func:`stage_request`)."""

    params: Any  # the params pointing at the staged data
    request: Any
    staged: dict[str, Any]  # stage_data's record (DVC md5s)
    prepared_dir: str
    manifests_dir: str
    data: Any
    manifests: Any
    train_ids: np.ndarray  # sorted
    retain_mask: np.ndarray  # over train_ids


def stage_request(params: Any) -> StagedRequest:
    """Load the request of ``params``, refuse an id MLflow holds for other content, stage
    its data and manifests, and read them: the start shared by the evaluate and tune flows.
    MLflow and DVC are imported here, not by the module the Ray workers load."""
    from pipeline_lib.modalities import get_modality
    from tasks import tracking, versioning

    tr = params.tracking
    request = load_request(params.resolve(params.request.file))
    tracking.check_request_id(tr.mlflow_uri, tr.experiment, request.request_id, request.digest)
    params, staged = versioning.stage_data(get_modality("image"), params, request)
    prepared_dir = str(params.resolve(params.data.out_dir))
    manifests_dir = str(params.resolve(params.request.out_dir))
    data = load_prepared(prepared_dir)
    man = load_manifests(manifests_dir)
    train_ids = np.sort(data.split_ids("train"))
    return StagedRequest(
        params,
        request,
        staged,
        prepared_dir,
        manifests_dir,
        data,
        man,
        train_ids,
        np.isin(train_ids, man.retain_ids),
    )


def datamodel_args(method_params: Any, params: Any) -> tuple[float, str, bool]:
    """(lam, estimator, anchor) of :func:`matching_targets_for` for a matching method."""
    lam, anchor = datamodel_settings(method_params, params.attribution.lam)
    return lam, params.attribution.estimator, anchor


def matching_targets_for(
    source: str,
    store_root: str,
    problem: Problem,
    original_outputs: np.ndarray,
    train_ids: np.ndarray,
    forget_ids: np.ndarray,
    multiple: float,
    seed: int,
    lam: float,
    estimator: str,
    anchor: bool = False,
    anchor_outputs: np.ndarray | None = None,
) -> list[MatchTargets]:
    """Targets for each original: the matching points (all of F, then multiple·|F| seeded
    retain points) are shared; DM-Direct subtracts the same Σ_F β from each original's own
    logits (and, with ``anchor``, each original's own |F|·κ,
    :func:`pipeline_lib.attribution.matching.full_model_anchor`; with ``anchor_outputs``,
    (K, T, C) logits of K reference models trained on D on every target point, one shared
    |F|·κ from their mean instead). The seconds recorded are
    those of computing the targets once (one request); the store's ridge factor is
    request-independent, computed once and cached in the store."""
    factor = None
    if source == "datamodels" and estimator == "ridge_dual":
        factor = AttributionStore.open(store_root).ridge_factor(lam)
    t0 = time.perf_counter()
    rows = matching_retain_rows(len(problem.forget), len(problem.retain), multiple, seed)
    cols = np.concatenate([problem.forget, problem.retain[rows]])
    store = AttributionStore.open(store_root)
    point_ids = store.targets().column("sample_id").to_numpy()[cols]
    # the flow verified every checksum when it ensured the store (train_store → check)
    masks, outputs = store.gather(store.columns_of(point_ids), verify=False)
    if source == "oracles":
        shared = oracle_targets(outputs)
        seconds = time.perf_counter() - t0
        per_model = [shared] * len(original_outputs)
    else:
        forget_pos = np.searchsorted(train_ids, np.sort(forget_ids))
        zero = np.zeros(outputs.shape[1:], dtype=np.float64)
        shift = -datamodel_targets(masks, outputs, zero, forget_pos, lam, estimator, factor)
        seconds = time.perf_counter() - t0
        per_model = [
            original_outputs[k][cols].astype(np.float64) - shift
            for k in range(len(original_outputs))
        ]
        if anchor and anchor_outputs is not None:
            pin = np.asarray(anchor_outputs)[:, cols].astype(np.float64).mean(axis=0)
            kappa = full_model_anchor(masks, outputs, pin, len(forget_pos), lam, estimator, factor)
            per_model = [t - kappa for t in per_model]
        elif anchor:
            full = np.stack([np.asarray(z)[cols] for z in original_outputs])
            kappa = full_model_anchor(masks, outputs, full, len(forget_pos), lam, estimator, factor)
            per_model = [t - a for t, a in zip(per_model, kappa, strict=True)]
    X = problem.X[torch.from_numpy(cols)]
    return [
        MatchTargets(
            X, torch.from_numpy(t.astype(np.float32)), len(problem.forget), source, seconds
        )
        for t in per_model
    ]
