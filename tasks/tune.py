"""Ray Tune edge of ``unlearn tune``: a method's declared search space as Ray Tune
distributions, one Tune trial per sampled setting (each trial unlearns the first K originals
with it and scores them against the oracle ensemble with the comparison's own machinery), and
the trials logged to MLflow as child runs of the tuning run.

The search spaces are plain data declared beside each method
(:mod:`pipeline_lib.methods.space`); only this module knows Ray Tune.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param
from ray import tune
from ray.tune.search import BasicVariantGenerator

from pipeline_lib.attribution.matching import MatchTargets
from pipeline_lib.comparison import Problem, summarise, unlearn_one
from pipeline_lib.config import (
    FisherConfig,
    ModelConfig,
    TrainConfig,
    UnlearnConfig,
    parse_section,
)
from pipeline_lib.config.presets import OBJECTIVES
from pipeline_lib.methods.space import Choice, Dimension, IntRange, LogUniform, Uniform
from tasks import tracking

#: What a trial reports; the objective is one of OBJECTIVES (lower is better).
REPORTED = (
    "klom_forget_mean",
    "klom_forget_p95",
    "klom_retain_mean",
    "klom_validation_mean",
    "avg_gap",
    "UA",
    "RA",
    "TA",
    "MIA_efficacy",
    "seconds",
)


def to_tune_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    """The declared dimensions as Ray Tune distributions (IntRange's ``high`` is included)."""
    out: dict[str, Any] = {}
    for key, dim in space.items():
        if isinstance(dim, LogUniform):
            out[key] = tune.loguniform(dim.low, dim.high)
        elif isinstance(dim, Uniform):
            out[key] = tune.uniform(dim.low, dim.high)
        elif isinstance(dim, IntRange):
            out[key] = tune.randint(dim.low, dim.high + 1)
        elif isinstance(dim, Choice):
            out[key] = tune.choice(list(dim.values))
        else:  # pragma: no cover - check_space refuses anything else at registration
            raise TypeError(f"{key}: not a search dimension: {dim!r}")
    return out


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) as Python numbers, so the params section accepts them."""
    return value.item() if isinstance(value, np.generic) else value


def score_setting(
    method: str,
    setting: Mapping[str, Any],
    *,
    problem: Problem,
    states: Sequence[Mapping[str, Any]],
    matches: Sequence[MatchTargets] | None,
    cfg: Mapping[str, Any],
    oracle_margins: np.ndarray,
    oracle_metrics: Sequence[Mapping[str, float]],
    seed: int,
) -> dict[str, float]:
    """Unlearn every original in ``states`` with ``method`` at ``setting`` (its section's
    values for the searched keys) and summarise them against the oracles, as ``unlearn
    evaluate`` does (:func:`pipeline_lib.comparison.summarise`). Returns :data:`REPORTED`."""
    unlearn = dict(cfg["unlearn"])
    unlearn[method] = {**unlearn[method], **{k: _plain(v) for k, v in setting.items()}}
    unlearn_cfg = parse_section(UnlearnConfig, unlearn, "unlearn")
    model_cfg = parse_section(ModelConfig, cfg["model"], "model")
    train_cfg = parse_section(TrainConfig, cfg["train"], "train")
    fisher_cfg = parse_section(FisherConfig, cfg["fisher"], "fisher")
    runs = [
        unlearn_one(
            method,
            state,
            problem,
            model_cfg,
            train_cfg,
            unlearn_cfg,
            fisher_cfg,
            seed + k,
            matches[k] if matches is not None else None,
            tuple(cfg["mia"]),
        )
        for k, state in enumerate(states)
    ]
    rows, _, _ = summarise({method: runs}, oracle_margins, oracle_metrics, problem, 1.0)
    row = rows[0]
    return {
        "klom_forget_mean": row["klom_forget_mean"],
        "klom_forget_p95": row["klom_forget_p95"],
        "klom_retain_mean": row["klom_retain_mean"],
        "klom_validation_mean": row["klom_validation_mean"],
        "avg_gap": row["avg_gap"],
        "UA": row["UA"],
        "RA": row["RA"],
        "TA": row["TA"],
        "MIA_efficacy": row["MIA_efficacy"],
        "seconds": row["seconds"],
    }


def _trial(config: dict[str, Any], *, method: str, threads: int, **data: Any) -> None:
    """One Tune trial (function trainable): score the sampled setting, report once."""
    import torch

    torch.set_num_threads(threads)
    tune.report(score_setting(method, config, **data))


def run_search(
    method: str,
    space: Mapping[str, Dimension],
    start: Mapping[str, Any],
    *,
    objective: str,
    trials: int,
    seed: int,
    storage: str | Path,
    cpus_per_trial: int,
    max_concurrent: int | None,
    problem: Problem,
    states: Sequence[Mapping[str, Any]],
    matches: Sequence[MatchTargets] | None,
    cfg: Mapping[str, Any],
    oracle_margins: np.ndarray,
    oracle_metrics: Sequence[Mapping[str, float]],
    unlearn_seed: int,
) -> list[dict[str, Any]]:
    """Run ``trials`` Ray Tune trials on the connected Ray: the first evaluates ``start`` (the
    params' current setting of the searched keys), the rest are seeded random samples of the
    space. Returns one dict per trial, in trial order: ``trial_id``, ``config`` (searched keys),
    ``metrics`` (:data:`REPORTED`, empty when it failed), ``error`` (None or the message)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            method=method,
            threads=cpus_per_trial,
            problem=problem,
            states=list(states),
            matches=list(matches) if matches is not None else None,
            cfg=dict(cfg),
            oracle_margins=oracle_margins,
            oracle_metrics=list(oracle_metrics),
            seed=unlearn_seed,
        ),
        {"cpu": cpus_per_trial},
    )
    search = BasicVariantGenerator(
        points_to_evaluate=[{k: _plain(start[k]) for k in space}],
        random_state=seed,
        max_concurrent=max_concurrent or 0,
    )
    storage = Path(storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        trainable,
        param_space=to_tune_space(space),
        tune_config=tune.TuneConfig(
            metric=objective, mode="min", num_samples=trials, search_alg=search
        ),
        run_config=tune.RunConfig(
            name=f"{method}-{int(time.time())}", storage_path=str(storage), verbose=0
        ),
    )
    grid = tuner.fit()
    out = []
    for result in grid:
        trial_id = result.path.rsplit("/", 1)[-1] if result.path else ""
        metrics = {k: float(result.metrics[k]) for k in REPORTED if k in (result.metrics or {})}
        out.append(
            {
                "trial_id": trial_id,
                "config": {k: _plain(v) for k, v in (result.config or {}).items()},
                "metrics": metrics,
                "error": None if result.error is None else str(result.error).splitlines()[0],
            }
        )
    # trial order: Tune names trial directories <trainable>_<id>_<index>_...
    out.sort(key=lambda t: _trial_index(t["trial_id"]))
    return out


def _trial_index(trial_dir: str) -> int:
    """The trial's creation index from Tune's directory name (``_trial_<exp>_<00003>_3_...``)."""
    m = re.search(r"_(\d{5})_", trial_dir)
    return int(m.group(1)) if m else 0


def best_trial(trials: Sequence[Mapping[str, Any]], objective: str) -> dict[str, Any]:
    """The finished trial with the lowest objective (the earliest on a tie)."""
    ok = [
        t
        for t in trials
        if t["error"] is None and math.isfinite(t["metrics"].get(objective, math.nan))
    ]
    if not ok:
        raise RuntimeError(
            "every tuning trial failed: " + "; ".join(str(t["error"]) for t in trials)
        )
    return dict(min(ok, key=lambda t: t["metrics"][objective]))


def log_trials(
    uri: str,
    parent_id: str,
    method: str,
    trials: Sequence[Mapping[str, Any]],
    fixed: Mapping[str, Any],
    tags: Mapping[str, str],
) -> list[str]:
    """One finished child run per trial under ``parent_id``: the method's whole section
    (``fixed`` overlaid with the trial's sampled values) as params, the reported metrics as
    metrics, status FAILED for a trial that raised. Returns the child run ids in trial order."""
    client = tracking.client_for(uri)
    exp_id = client.get_run(parent_id).info.experiment_id
    now = int(time.time() * 1000)
    ids = []
    for i, t in enumerate(trials):
        child = tracking.create_run(
            client,
            exp_id,
            f"{tags.get('request_id', 'tune')}/{method}/trial-{i}",
            {
                **tags,
                "mlflow.parentRunId": parent_id,
                "kind": "tuning-trial",
                "method": method,
                "trial": str(i),
                "ray_tune.trial_dir": t["trial_id"],
                **({"error": t["error"][:5000]} if t["error"] else {}),
            },
        )
        params = {**fixed, **t["config"]}
        client.log_batch(
            child,
            metrics=[Metric(k, float(v), now, 0) for k, v in sorted(t["metrics"].items())],
            params=[Param(f"unlearn.{method}.{k}", str(v)) for k, v in sorted(params.items())],
        )
        tracking.end_run(uri, child, "FAILED" if t["error"] else "FINISHED")
        ids.append(child)
    return ids
