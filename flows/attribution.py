"""The ``attribution`` flow: train M subset models (or N oracles of a request) on Ray into an
attribution store, then fit datamodels and measure LDS on held-out subset models.

Progress shows on the terminal (a bar with models done, models/s and ETA) and as a Prefect
progress artifact; one MLflow parent run records the store manifest, the masks digest,
per-chunk timing and throughput, and LDS.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow
from prefect.logging import get_run_logger

from pipeline_lib.config import environment_overrides, load_params, replace
from pipeline_lib.data.images import load_prepared
from pipeline_lib.data.requests import load_manifests, load_request
from pipeline_lib.modalities import get_modality
from tasks import tracking, versioning
from tasks.stores import datamodel_lds, store_dir, store_spec, train_spec


@flow(name="attribution")
def attribution_flow(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    kind: str = "subsets",
) -> dict[str, Any]:
    """``kind='subsets'``: ``attribution.n_models`` models on random alpha-subsets, then LDS.
    ``kind='oracles'``: ``attribution.oracles`` models retrained on the request's retain set."""
    logger = get_run_logger()
    # The environment (MLFLOW_TRACKING_URI, RAY_ADDRESS) applies to deployments too.
    params = load_params(params_path, {**environment_overrides(os.environ), **(overrides or {})})
    tr = params.tracking
    root = Path(tr.dvc_root).resolve()
    base_mask = None
    if kind == "oracles":
        request = load_request(params.resolve(params.request.file))
        params, staged = versioning.stage_data(get_modality("image"), params, request)
        prepared_md5 = staged["prepared_md5"]
        man = load_manifests(params.resolve(params.request.out_dir))
        data = load_prepared(params.resolve(params.data.out_dir))
        train_ids = np.sort(data.split_ids("train"))
        base_mask = np.isin(train_ids, man.retain_ids)
        n_models, run_name = params.attribution.oracles, f"oracles-{request.request_id}"
    elif kind == "subsets":
        prepared, prepared_md5 = versioning.stage_prepare(get_modality("image"), params, root)
        params = replace(params, data=replace(params.data, out_dir=prepared))
        data = load_prepared(params.resolve(params.data.out_dir))
        n_models, run_name = params.attribution.n_models, None
    else:
        raise ValueError(f"kind {kind!r} unknown; valid: subsets, oracles")
    spec = store_spec(params, data, kind, n_models, base_mask)
    store_root = store_dir(params, spec)
    run_name = run_name or f"attribution-{spec.digest[:12]}"
    run_id = tracking.start_run(
        tr.mlflow_uri,
        tr.experiment,
        run_name,
        {
            "kind": f"attribution-{kind}",
            "store": str(store_root),
            "store_digest": spec.digest,
            "data_content_hash": data.content_hash,
            "dvc.prepared_md5": prepared_md5,
        },
        str(root),
    )
    try:
        stats = train_spec(params, spec, store_root, base_mask)
        result: dict[str, Any] = {"store": str(store_root), "stats": stats, "run_id": run_id}
        heldout = params.attribution.lds_heldout
        if kind == "subsets" and 0 < heldout < n_models - 1:
            result["lds"] = datamodel_lds(
                str(store_root), heldout, params.attribution.estimator, params.attribution.lam
            )
        tracking.log_store(
            tr.mlflow_uri,
            run_id,
            dataclasses.asdict(spec),
            stats,
            result.get("lds", {}),
            str(store_root / "manifest.json"),
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    logger.info("attribution store %s: %s", store_root, json.dumps(result.get("lds", {})))
    return result
