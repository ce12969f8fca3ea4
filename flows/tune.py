"""The ``tune`` flow: search a method's hyper-parameters with Ray Tune on a validation request
and write the best setting as a named preset.

prepare + extract (DVC) → the evaluation's originals and oracles (stores of kind
``originals`` / ``oracles``, ``evaluate.n_models`` each, reused when present; the subset
models for ``dmm``, OM's own oracles for ``oracle_matching``) → ``tune.trials`` Ray Tune
trials, each unlearning the first ``tune.models`` originals with one setting and scoring them
against all the oracles (forget-KLoM mean or Avg. Gap, :func:`pipeline_lib.comparison.summarise`)
→ one MLflow parent run with a child run per trial → the best trial's setting in
``presets/<dataset>-<model>/<method>.yaml`` (atomic; an existing file only with ``overwrite``).

Tune on one request and evaluate the preset on others (``unlearn evaluate --preset``): the
score a search reports on its own validation request is optimistic.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow
from prefect.logging import get_run_logger

from pipeline_lib.attribution.datamodels import margins as margins_of
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.comparison import metrics_of_logits
from pipeline_lib.config import (
    ConfigError,
    Params,
    RayConfig,
    environment_overrides,
    load_params,
    parse_section,
    to_dict,
)
from pipeline_lib.config.presets import preset_file, preset_name, write_preset
from pipeline_lib.methods import get_method
from pipeline_lib.methods.space import describe
from tasks import attribution as ray_attr
from tasks import evaluation as ray_eval
from tasks import tracking
from tasks import tune as ray_tune
from tasks.stores import anchor_outputs_for, ensure_store


def check_tune(method: str, params: Params, name: str | None, overwrite: bool) -> Path:
    """Everything ``unlearn tune`` can refuse before any work: the method (known, not a
    class-forgetting method, with a search space), ``tune.models`` ≤ ``evaluate.n_models``,
    distinct store seeds, and the preset file (exists → only with ``overwrite``). Returns the
    preset file's path."""
    m = get_method(method)
    if m.class_only:
        raise ConfigError(
            f"--method {method}: forgets whole classes; tuning scores random forget sets"
        )
    if not m.search_space:
        raise ConfigError(f"--method {method}: declares no search space (nothing to tune)")
    if params.tune.models > params.evaluate.n_models:
        raise ConfigError(
            f"tune.models: {params.tune.models} exceeds evaluate.n_models "
            f"({params.evaluate.n_models}), the originals there are"
        )
    seeds = [params.evaluate.originals_seed, params.evaluate.oracles_seed, params.attribution.seed]
    if method == "oracle_matching":
        seeds.append(params.unlearn.oracle_matching.seed)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(
            "evaluate.originals_seed, evaluate.oracles_seed, attribution.seed (and "
            "unlearn.oracle_matching.seed for oracle_matching) must differ"
        )
    path = preset_file(
        params.tracking.dvc_root,
        name or preset_name(params.data.name, params.model.name),
        method,
    )
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{path} exists: pass --overwrite to replace it, or --name another preset"
        )
    return path


@flow(name="tune-method")
def tune_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    method: str = "dmm",
    name: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tune ``method`` on the request of the params file; write the best setting as preset
    ``name`` (default ``<dataset>-<model>``). Returns the trials, the best one, the preset
    file and the MLflow run ids."""
    logger = get_run_logger()
    params = load_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    path = check_tune(method, params, name, overwrite)
    tr, tn, n = params.tracking, params.tune, params.evaluate.n_models
    st = ray_eval.stage_request(params)
    params, request, staged, data, man = st.params, st.request, st.staged, st.data, st.manifests
    prepared_dir, manifests_dir = st.prepared_dir, st.manifests_dir
    train_ids, retain_mask = st.train_ids, st.retain_mask
    space = get_method(method).search_space
    start = to_dict(params.unlearn.method_params(method))
    run_id = tracking.start_run(
        tr.mlflow_uri,
        tr.experiment,
        f"tune-{method}-{request.request_id}",
        {
            "kind": "tuning",
            "method": method,
            "request_digest": request.digest,
            "objective": tn.objective,
            "dvc.prepared_md5": staged["prepared_md5"],
            "dvc.manifests_md5": staged["manifests_md5"],
            **{f"space.{k}": v for k, v in describe(space).items()},
        },
        str(Path(tr.dvc_root).resolve()),
    )
    try:
        ray_cfg = parse_section(RayConfig, to_dict(params.ray), "ray")
        logger.info("Ray: %s", ray_attr.connect(ray_cfg))
        stores = {
            "originals": ensure_store(
                params, data, "originals", n, None, params.evaluate.originals_seed
            ),
            "oracles": ensure_store(
                params, data, "oracles", n, retain_mask, params.evaluate.oracles_seed
            ),
        }
        source = get_method(method).needs_targets
        if source == "datamodels":
            stores["targets"] = ensure_store(params, data, "subsets", params.attribution.n_models)
        elif source == "oracles":
            om = params.unlearn.oracle_matching
            stores["targets"] = ensure_store(
                params, data, "oracles", om.n_oracles, retain_mask, om.seed
            )
        originals = AttributionStore.open(stores["originals"][0])
        oracles = AttributionStore.open(stores["oracles"][0])
        problem = ray_eval.build_problem(originals, prepared_dir, manifests_dir)
        labels = problem.y.numpy()
        _, _, orig_out = originals.load()
        _, _, orac_out = oracles.load()
        orig_out = orig_out[: tn.models].astype(np.float32)
        orac_out = orac_out.astype(np.float32)
        oracle_margins = margins_of(orac_out, labels)
        cfg = ray_eval.config_payload(params)
        mia = tuple(cfg["mia"])  # the same MIA settings (and draws) as the trials use
        oracle_metrics = [metrics_of_logits(torch.from_numpy(z), problem, *mia) for z in orac_out]
        matches = None
        if source:
            mp = params.unlearn.method_params(method)
            matches = ray_eval.matching_targets_for(
                source,
                stores["targets"][0],
                problem,
                orig_out,
                train_ids,
                man.forget_ids,
                mp.retain_multiple,
                params.unlearn.seed,
                *ray_eval.datamodel_args(mp, params),
                anchor_outputs=(
                    anchor_outputs_for(mp, params, data, originals)
                    if source == "datamodels"
                    else None
                ),
            )
        weights = dict(originals.model_weights())
        states = [weights[k] for k in range(tn.models)]
        logger.info(
            "tuning %s: %d trials, %d originals each, %d oracles, objective %s",
            method,
            tn.trials,
            tn.models,
            n,
            tn.objective,
        )
        trials = ray_tune.run_search(
            method,
            space,
            start,
            objective=tn.objective,
            trials=tn.trials,
            seed=tn.seed,
            storage=params.resolve(tn.out_dir),
            cpus_per_trial=tn.cpus_per_trial,
            max_concurrent=tn.max_concurrent,
            problem=problem,
            states=states,
            matches=matches,
            cfg=cfg,
            oracle_margins=oracle_margins,
            oracle_metrics=oracle_metrics,
            unlearn_seed=params.unlearn.seed,
        )
        tags = {"request_id": request.request_id, "request_digest": request.digest}
        children = ray_tune.log_trials(tr.mlflow_uri, run_id, method, trials, start, tags)
        best = ray_tune.best_trial(trials, tn.objective)
        best_index = trials.index(next(t for t in trials if t["trial_id"] == best["trial_id"]))
        preset = {
            "preset": path.parent.name,
            "method": method,
            "dataset": params.data.name,
            "model": params.model.name,
            "params": {**start, **best["config"]},
            "tuning": {
                "objective": tn.objective,
                "score": best["metrics"][tn.objective],
                "start_score": trials[0]["metrics"].get(tn.objective),
                "metrics": best["metrics"],
                "searched": sorted(space),
                "trials": len(trials),
                "models": tn.models,
                "oracles": n,
                # the store the datamodel targets came from (lam and the steps suit its size)
                **(
                    {
                        "subset_models": params.attribution.n_models,
                        "subset_alpha": params.attribution.alpha,
                    }
                    if get_method(method).needs_targets == "datamodels"
                    else {}
                ),
                "request_id": request.request_id,
                "request_digest": request.digest,
                "mlflow_run_id": run_id,
                "mlflow_trial_run_id": children[best_index],
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        }
        write_preset(path, preset, overwrite=overwrite)
        client = tracking.client_for(tr.mlflow_uri)
        client.log_artifact(run_id, str(path), artifact_path="preset")
        tracking.set_tags(
            tr.mlflow_uri,
            run_id,
            {"preset": preset["preset"], "preset_file": str(path), "best_trial": str(best_index)},
        )
        from mlflow.entities import Metric

        now = int(dt.datetime.now().timestamp() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"best.{k}", float(v), now, 0) for k, v in sorted(best["metrics"].items())
            ],
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    return {
        "run_id": run_id,
        "children": children,
        "trials": trials,
        "best": best,
        "best_index": best_index,
        "preset": preset,
        "preset_file": str(path),
    }
