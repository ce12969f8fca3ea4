"""What an unlearning method reads beyond the data, for the pipeline and the service: Fisher
statistics (found in the statistics store or computed), an attribution store (trained on Ray
the first time), the oracle. Each comes with the digests that key the unlearning cache."""

from __future__ import annotations

from typing import Any

from prefect.logging import get_run_logger

from pipeline_lib.config import Params, to_dict
from pipeline_lib.config.presets import preset_store_mismatch
from pipeline_lib.methods.matching import anchor_reference
from tasks import compute, tracking
from tasks.compute import with_files
from tasks.statistics import fisher_statistics
from tasks.stores import ensure_store


def fisher_files(fisher: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the (cached) unlearning task needs of the Fisher statistics: the files and their
    content hashes, nothing that changes between runs that reuse them."""
    if fisher is None:
        return None
    keys = ("forget_path", "retain_path", "forget_digest", "retain_digest")
    return {k: fisher[k] for k in keys}


def fisher_metrics(fisher: dict[str, Any]) -> dict[str, float]:
    return {
        "time.fisher_seconds": fisher["seconds"],
        **{f"stats.fisher_{s}_reused": float(fisher[f"{s}_reused"]) for s in ("forget", "retain")},
        "stats.retain_from_full": float(fisher.get("retain_from") == "full_minus_forget"),
    }


def request_cost_block(fisher: dict[str, Any] | None, method_seconds: float) -> dict[str, float]:
    """The report's cost split for a request (:func:`pipeline_lib.evaluation.metrics.request_cost`):
    its own cost (forget statistics, I_R, method) and the amortised full-data statistics."""
    from pipeline_lib.evaluation.metrics import request_cost

    if fisher is None:
        return request_cost(0.0, 0.0, method_seconds, 0.0, 0.0)
    return request_cost(
        fisher["forget_seconds"],
        fisher["retain_seconds"],
        method_seconds,
        float(fisher.get("amortised_seconds", 0.0)),
        float(fisher.get("direct_retain_seconds", fisher["retain_seconds"])),
    )


def attribution_store_for(
    params: Params, source: str, request_data: dict[str, str], method: str | None = None
) -> dict[str, Any]:
    """The store an output-matching method takes its targets from, trained on Ray the first
    time and reused afterwards: ``attribution.n_models`` subset models (datamodels, for dmm;
    independent of the request) or ``oracle_matching.n_oracles`` oracles on the retain set.
    ``method`` (default ``unlearn.method``) names the method in the warning logged when its
    selected preset was tuned with another subset store. With ``unlearn.dmm.anchor_models``
    > 0 also the store of those reference models (``anchor_root``)."""
    import numpy as np

    from pipeline_lib.data.images import load_prepared
    from pipeline_lib.data.requests import load_manifests

    logger = get_run_logger()
    data = load_prepared(request_data["prepared_dir"])
    ref = None
    if source == "datamodels":
        warning = preset_store_mismatch(
            to_dict(params),
            method or params.unlearn.method,
            params.attribution.n_models,
            params.attribution.alpha,
        )
        if warning:
            logger.warning(warning)
        root, stats = ensure_store(params, data, "subsets", params.attribution.n_models)
        ref = anchor_reference(params.unlearn.method_params(method or params.unlearn.method))
        if ref is not None:  # dmm's anchor from reference models trained on all of D
            anchor_root, _ = ensure_store(params, data, "originals", ref[0], None, ref[1])
    else:
        man = load_manifests(request_data["manifests_dir"])
        train_ids = np.sort(data.split_ids("train"))
        om = params.unlearn.oracle_matching
        root, stats = ensure_store(
            params, data, "oracles", om.n_oracles, np.isin(train_ids, man.retain_ids), om.seed
        )
    logger.info(
        "attribution store %s (%d models trained now)", root, stats.get("models_trained", 0)
    )
    out = {
        "root": root,
        "masks_digest": stats["masks_digest"],
        "attribution": to_dict(params.attribution),
    }
    if ref is not None:  # its directory is named by its spec's digest (seed, recipe, data)
        out["anchor_root"] = anchor_root
    return out


def method_extras(
    modality: Any,
    params: Any,
    method: Any,
    original: dict[str, Any],
    oracle: dict[str, Any],
    request_data: dict[str, str],
    run_id: str,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the method reads beyond the data (each with the digests that key the unlearning
    cache): Fisher statistics (found or computed), an attribution store (trained on Ray the
    first time), the oracle. Returns (extras, the Fisher result or None)."""
    tr = params.tracking
    needs = modality.method_needs(method, params)
    extras: dict[str, Any] = {}
    fisher = None
    if "fisher" in needs:
        fisher = fisher_statistics(params, original)
        extras["fisher"] = fisher_files(fisher)
        tracking.set_tags(
            tr.mlflow_uri,
            run_id,
            {
                f"stats.fisher_{s}.{k}": str(fisher[f"{s}_{k}"])
                for s in ("forget", "retain")
                for k in ("digest", "path")
            },
        )
    if "store" in needs:
        extras["store"] = attribution_store_for(
            params, method.needs_targets, request_data, method.name
        )
    if "oracle" in needs:
        extras["oracle"] = oracle
    return extras, fisher


def unlearn_with_inputs(
    modality: Any,
    params: Params,
    method: Any,
    original: dict[str, Any],
    oracle: dict[str, Any] | None,
    request_data: dict[str, str],
    run_id: str,
    artifacts: str,
    code: str,
) -> tuple[dict[str, Any], dict[str, Any] | None, float]:
    """The method's inputs (:func:`method_extras`), then the cached unlearning task on
    ``original``'s weights. Returns (the unlearned result, the Fisher result or None, the
    unlearning seconds: the method's plus the statistics')."""
    extras, fisher = method_extras(modality, params, method, original, oracle, request_data, run_id)
    unlearned = with_files(
        compute.unlearn,
        ("path",),
        modality.name,
        request_data,
        original,
        modality.unlearn_sections(to_dict(params)),
        extras,
        artifacts,
        code,
    )
    return unlearned, fisher, unlearned["seconds"] + (fisher["seconds"] if fisher else 0.0)
