"""The ``evaluate`` flow: compare unlearning methods on one request against oracle ensembles.

prepare + extract (DVC) → N originals and N oracles through the many-model engine on Ray
(stores of kind ``originals`` and ``oracles``, reused when present) → the subset-model store
for ``dmm`` and a separate oracle store for ``oracle_matching`` when those methods are asked
for → every original unlearned by every method (one Ray task per pair) → KLoM (ours or EasyDUB's
binning), accuracies, seeded MIA draws (mean ± std), Avg. Gap with its spread, U-LiRA and
LiRA against the original, and cost per method → comparison.md / comparison.csv / klom.png → one MLflow
parent run with a child run per method.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from pipeline_lib.attribution.datamodels import margins as margins_of
from pipeline_lib.attribution.matching import MatchTargets
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.comparison import (
    floor_scores,
    markdown_table,
    metrics_of_logits,
    plot_klom,
    summarise,
    write_tables,
)
from pipeline_lib.config import (
    ConfigError,
    Params,
    environment_overrides,
    flatten,
    load_params,
    to_dict,
)
from pipeline_lib.methods import METHODS, get_method
from tasks import attribution as ray_attr
from tasks import evaluation as ray_eval
from tasks import tracking
from tasks.evaluation import build_problem
from tasks.stores import Progress, anchor_outputs_for, ensure_store

NONE_ROW = "none (original)"


def default_methods() -> list[str]:
    """Every registered method that applies to a random forget set."""
    return [name for name, m in METHODS.items() if not m.class_only]


def check_methods(methods: list[str], params: Params) -> list[str]:
    """Validate method names (unknown → the valid list) and their preconditions."""
    if not methods:
        raise ConfigError("--methods: give at least one method")
    for m in methods:
        if get_method(m).class_only:
            raise ConfigError(
                f"{m} forgets whole classes; the evaluation compares methods on random forget "
                "sets (run it with `unlearn run` on a class request, or benchmarks/class_forgetting.py)"
            )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods repeats a method: {','.join(methods)}")
    seeds = {
        "evaluate.originals_seed": params.evaluate.originals_seed,
        "evaluate.oracles_seed": params.evaluate.oracles_seed,
        "attribution.seed": params.attribution.seed,
    }
    if "oracle_matching" in methods:
        seeds["unlearn.oracle_matching.seed"] = params.unlearn.oracle_matching.seed
    if len(set(seeds.values())) != len(seeds):
        raise ConfigError(
            "store seeds must differ, or two roles would train the same models (e.g. oracle "
            f"matching targets from the evaluation's own oracles): {seeds}"
        )
    return methods


@task(name="connect-ray")
def connect(ray_cfg: dict) -> str:
    from pipeline_lib.config import RayConfig, parse_section

    return ray_attr.connect(parse_section(RayConfig, ray_cfg, "ray"))


#: Targets for each original (:func:`tasks.evaluation.matching_targets_for`), as a task
matching_targets = task(name="matching-targets")(ray_eval.matching_targets_for)


@flow(name="evaluate-methods")
def evaluate_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    methods: list[str] | None = None,
) -> dict[str, Any]:
    """Compare ``methods`` (default: all registered) on the request of the params file with
    ``evaluate.n_models`` originals and oracles. Returns the table rows, files and run ids."""

    logger = get_run_logger()
    params = load_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    methods = check_methods(list(methods or default_methods()), params)
    tr, n = params.tracking, params.evaluate.n_models
    st = ray_eval.stage_request(params)
    params, request, staged, data, man = st.params, st.request, st.staged, st.data, st.manifests
    prepared_dir, manifests_dir = st.prepared_dir, st.manifests_dir
    train_ids, retain_mask = st.train_ids, st.retain_mask
    run_id = tracking.start_run(
        tr.mlflow_uri,
        tr.experiment,
        f"evaluate-{request.request_id}",
        {
            "kind": "evaluation",
            "request_digest": request.digest,
            "methods": ",".join(methods),
            "dvc.prepared_md5": staged["prepared_md5"],
            "dvc.manifests_md5": staged["manifests_md5"],
        },
        str(Path(tr.dvc_root).resolve()),
    )
    try:
        logger.info("Ray: %s", connect(to_dict(params.ray)))
        stores = {
            "originals": ensure_store(
                params, data, "originals", n, None, params.evaluate.originals_seed
            ),
            "oracles": ensure_store(
                params, data, "oracles", n, retain_mask, params.evaluate.oracles_seed
            ),
        }
        if "dmm" in methods:
            stores["subsets"] = ensure_store(params, data, "subsets", params.attribution.n_models)
        if "oracle_matching" in methods:
            om = params.unlearn.oracle_matching
            stores["om_oracles"] = ensure_store(
                params, data, "oracles", om.n_oracles, retain_mask, om.seed
            )
        originals = AttributionStore.open(stores["originals"][0])
        oracles = AttributionStore.open(stores["oracles"][0])
        problem = build_problem(originals, prepared_dir, manifests_dir)
        if not np.array_equal(
            originals.targets().column("sample_id").to_numpy(),
            oracles.targets().column("sample_id").to_numpy(),
        ):
            raise RuntimeError("the originals and oracle stores disagree on their target points")
        labels = problem.y.numpy()
        _, _, orig_out = originals.load()
        _, _, orac_out = oracles.load()
        orig_out, orac_out = orig_out.astype(np.float32), orac_out.astype(np.float32)
        oracle_margins = margins_of(orac_out, labels)
        ev = params.evaluate
        mia = (ev.mia_svc_c, ev.mia_folds, ev.seed, ev.mia_seeds)
        oracle_metrics = [metrics_of_logits(torch.from_numpy(z), problem, *mia) for z in orac_out]
        results: dict[str, list[dict[str, Any]]] = {
            NONE_ROW: [
                {
                    "seconds": 0.0,
                    "margins": margins_of(z, labels).astype(np.float32),
                    "metrics": metrics_of_logits(torch.from_numpy(z), problem, *mia),
                }
                for z in orig_out
            ]
        }
        match: dict[str, list[MatchTargets]] = {}
        for m in methods:
            source = get_method(m).needs_targets
            if source:
                mp = params.unlearn.method_params(m)
                root = stores["subsets" if source == "datamodels" else "om_oracles"][0]
                match[m] = matching_targets(
                    source,
                    root,
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
        states = dict(originals.model_weights())
        jobs = [
            {
                "method": m,
                "model_id": k,
                "state": states[k],
                "seed": params.unlearn.seed + k,
                "match": match[m][k] if m in match else None,
            }
            for m in methods
            for k in range(n)
        ]
        cfg = ray_eval.config_payload(params)
        from pipeline_lib.config import RayConfig, parse_section

        ray_cfg = parse_section(RayConfig, to_dict(params.ray), "ray")
        reference = ray_eval.retrain_seconds(problem, cfg, ray_cfg, params.train.oracle_seed)
        retrain_s = float(np.mean(reference))
        logger.info("retraining one model: %.2fs (mean of %d)", retrain_s, len(reference))
        progress = Progress(tracking.artifact_key("evaluate", request.request_id))
        try:
            out = ray_eval.run_jobs(jobs, problem, cfg, ray_cfg, lambda d, t: progress(d, t, {}))
        finally:
            progress.close()
        for m in methods:
            results[m] = [r for r in out if r["method"] == m]
        if "retrain" in methods:
            # the N retrain jobs ran in the same queue, under the same load as every other
            # method: the fairest denominator (the reference runs are kept in the JSON)
            retrain_s = float(np.mean([r["seconds"] for r in results["retrain"]]))
        rows, floor, scores = summarise(
            results,
            oracle_margins,
            oracle_metrics,
            problem,
            retrain_s,
            original_margins=np.stack([r["margins"] for r in results[NONE_ROW]]),
            binning=ev.klom_binning,
            ulira_fixed_variance=ev.ulira_fixed_variance,
        )
        out_dir = params.resolve(params.evaluate.report_dir) / request.request_id / "comparison"
        title = f"{request.request_id}: |F| = {len(problem.forget)}, N = {n}"
        files = write_tables(rows, out_dir, title)
        plot_klom(
            scores,
            floor_scores(oracle_margins, binning=ev.klom_binning),
            problem,
            out_dir / "klom.png",
            title,
        )
        files["klom.png"] = str(out_dir / "klom.png")
        summary = {
            "request_id": request.request_id,
            "n_models": n,
            "retrain_seconds": retrain_s,
            "reference_retrain_seconds": reference,
            "klom_binning": ev.klom_binning,
            "mia_seeds": ev.mia_seeds,
            "noise_floor": floor,
            "rows": rows,
            "stores": {k: v[0] for k, v in stores.items()},
            "masks_digests": {k: v[1]["masks_digest"] for k, v in stores.items()},
        }
        (out_dir / "comparison.json").write_text(
            json.dumps(summary, indent=2, default=float) + "\n"
        )
        files["comparison.json"] = str(out_dir / "comparison.json")
        method_params = {
            m: {f"unlearn.{m}.{k}": v for k, v in flatten_section(params, m).items()}
            for m in methods
        }
        children = tracking.log_comparison(
            tr.mlflow_uri,
            tr.experiment,
            run_id,
            rows,
            method_params,
            floor,
            list(files.values()),
            {"request_id": request.request_id, "request_digest": request.digest},
        )
        create_markdown_artifact(
            markdown_table(rows, title),
            key=tracking.artifact_key("comparison", request.request_id),
            description=f"method comparison, MLflow run {run_id}",
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    # the certificate of the request, if the deletion service processed it, rendered again
    # with this comparison's KLoM and ensemble MIA for its method (tasks/lineage.py)
    from tasks.lineage import refresh_certificate

    certificate = refresh_certificate(tr.mlflow_uri, request.request_id)
    if certificate is not None:
        logger.info("certificate of %s rendered again: %s", request.request_id, certificate)
    return {
        "run_id": run_id,
        "children": children,
        "rows": rows,
        "files": files,
        "floor": floor,
        "certificate": str(certificate) if certificate else None,
    }


def flatten_section(params: Params, method: str) -> dict[str, Any]:
    """The method's hyper-parameters as a flat dict (empty when it has none)."""
    flat = flatten(params)
    prefix = f"unlearn.{method}."
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
