"""Tasks of the deletion service: the tombstone set under DVC, exact training of a production
version, and the processing of one claimed request (unlearn from the current production
version, evaluate, gate, register, move the alias).

State lives in real stores: the ledger (:mod:`tasks.ledger`, in the tracking database), the
registry (:mod:`tasks.registry`, MLflow), the tombstones and manifests (DVC). Nothing here
rewrites a tracked file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pipeline_lib.config import flatten, replace, to_dict
from pipeline_lib.data.requests import (
    DeletionRequest,
    RequestError,
    load_manifests,
    request_document,
    request_from_dict,
)
from pipeline_lib.io import code_version
from pipeline_lib.modalities import Modality
from pipeline_lib.service.gates import evaluate_gates
from pipeline_lib.service.tombstones import (
    append_tombstones,
    read_tombstones,
    tombstone_digest,
    tombstoned_ids,
    write_tombstones,
)
from tasks import compute, lineage, registry, tracking, versioning
from tasks.compute import with_files
from tasks.ledger import Ledger, LedgerRow
from tasks.method_inputs import fisher_metrics, request_cost_block, unlearn_with_inputs
from tasks.results import keyed
from tasks.statistics import full_data_statistics

RETRY = dict(retries=2, retry_delay_seconds=2)


def tombstones_path(modality: Modality, params: Any) -> str:
    """Where the cumulative tombstone set of the production model lives (DVC-root relative)."""
    return f"{versioning.RUNS_DIR}/{modality.name}/{params.service.model_name}/tombstones.parquet"


@task(name="dvc-add-tombstones", cache_policy=NO_CACHE, **RETRY)
def version_tombstones(dvc_root: str, rel_path: str) -> str:
    """``dvc add`` the tombstone file (its version enters the DVC cache); returns its md5.

    Never cached: its inputs are the same for every request of a sweep while the file's
    content is not (Prefect's default policy would return the first request's md5 and skip
    the ``dvc add`` of every later one)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "--quiet", rel_path],
        cwd=dvc_root,
        env=versioning._dvc_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc add {rel_path} failed: {proc.stderr.strip()[-2000:]}")
    meta = yaml.safe_load((Path(dvc_root) / f"{rel_path}.dvc").read_text())
    return str(meta["outs"][0]["md5"])


def _request_file(request: DeletionRequest, tmp: Path) -> Path:
    path = tmp / f"{request.request_id}.yaml"
    path.write_text(yaml.safe_dump(request_document(request), sort_keys=False))
    return path


def _arch_config(modality: Modality, params: Any, prepared_dir: str) -> dict[str, Any]:
    """What rebuilds the module from the safetensors weights: the modality, the model section
    and the data's shape and classes (images)."""
    cfg = to_dict(params)
    arch: dict[str, Any] = {"modality": modality.name, "model": cfg[modality.model_section]}
    meta_file = Path(prepared_dir) / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        arch["data"] = {k: meta[k] for k in ("shape", "n_classes", "dataset") if k in meta}
    return arch


def _staged_params(params: Any, prepared: str, manifests: str | None) -> Any:
    changes: dict[str, Any] = {}
    if hasattr(params, "data"):
        changes["data"] = replace(params.data, out_dir=prepared)
    if manifests and hasattr(params.request, "out_dir"):
        changes["request"] = replace(params.request, out_dir=manifests)
    return replace(params, **changes) if changes else params


def train_exact(modality: Modality, params: Any, reason: str) -> dict[str, Any]:
    """Train a model from scratch on the prepared data minus every tombstoned id, register it
    as an *exact* version and point ``production`` at it. Returns version, run id, result."""
    logger = get_run_logger()
    svc, tr = params.service, params.tracking
    root = Path(tr.dvc_root).resolve()
    prepared, prepared_md5 = versioning.stage_prepare(modality, params, root)
    tomb_rel = tombstones_path(modality, params)
    tombs = read_tombstones(root / tomb_rel)
    gone = tombstoned_ids(tombs)
    data = {"prepared_dir": str(root / prepared), "prepared_md5": prepared_md5}
    manifests = None
    tomb_md5 = ""
    if len(gone):
        tomb_md5 = version_tombstones(str(root), tomb_rel)
        digest = tombstone_digest(tombs)
        synthetic = DeletionRequest(
            request_id=f"exact-{svc.model_name}-{digest[:12]}",
            reason="exact retrain on the data minus the tombstones",
            kind="sample_ids",
            sample_ids=tuple(str(i) for i in gone),
        )
        with tempfile.TemporaryDirectory() as tmp:
            manifests, manifests_md5 = versioning.stage_extract(
                modality, root, synthetic, _request_file(synthetic, Path(tmp)), prepared
            )
        data.update(manifests_dir=str(root / manifests), manifests_md5=manifests_md5)
    params = _staged_params(params, prepared, manifests)
    cfg = to_dict(params)
    code = code_version()
    run_name = f"exact-{svc.model_name}-{len(gone)}-tombstones"
    run_id = tracking.start_run(
        tr.mlflow_uri,
        tr.experiment,
        run_name,
        {
            "kind": "exact-retrain",
            "pipeline": modality.tag,
            "service.model_name": svc.model_name,
            "reason": reason,
            "tombstones.count": str(len(gone)),
            "tombstones.md5": tomb_md5,
            "dvc.prepared_md5": prepared_md5,
            "code_version": code,
        },
        str(root),
    )
    try:
        result = with_files(
            compute.train_model,
            ("path",),
            modality.name,
            data,
            "original" if not len(gone) else "exact",
            modality.train_sections(cfg),
            params.train.seed,
            str(params.resolve(tr.artifacts_dir)),
            code,
        )
        tracking.set_tags(tr.mlflow_uri, run_id, {"time.train_seconds": f"{result['seconds']:.3f}"})
        registry.ensure_registered_model(
            tr.mlflow_uri, svc.model_name, f"unlearnflow production model ({modality.name})"
        )
        version = registry.register_version(
            tr.mlflow_uri,
            svc.model_name,
            result["path"],
            _arch_config(modality, params, data["prepared_dir"]),
            run_id,
            {
                "kind": "exact",
                "state_digest": result["digest"],
                "data_version": prepared_md5,
                "tombstones_md5": tomb_md5,
                "tombstones_count": len(gone),
                "reason": reason,
            },
            set_production=True,
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    logger.info(
        "exact version %s of %s (%d tombstoned ids left out) is production",
        version,
        svc.model_name,
        len(gone),
    )
    if manifests:
        trained_on = load_manifests(data["manifests_dir"]).retain_ids
    else:  # the modality's own reader: the image loader cannot read a text corpus
        table, _, _, id_column = modality.lineage_table(data["prepared_dir"])
        trained_on = table[id_column][table["split"] == "train"].to_numpy()
    stats = version_statistics(modality, params, result, trained_on)
    return {"version": version, "run_id": run_id, "result": result, "full_statistics": stats}


def version_statistics(
    modality: Modality, params: Any, weights: dict[str, Any], trained_on: Any
) -> dict[str, Any] | None:
    """The amortised statistics of a newly registered version: its full-data Fisher sums over
    the ids it was trained on (``full-data-statistics``), when the service's method reads
    Fisher statistics, so that each later request unlearned from it computes only its forget
    set (``stats.retain_from``). Off the request's own path; a failure is logged and the next
    request computes I_R directly."""
    if "fisher" not in modality.method_needs(modality.get_method(params.unlearn.method), params):
        return None
    try:
        return full_data_statistics(
            params,
            {"path": weights["path"], "digest": weights["digest"]},
            [str(i) for i in trained_on],
        )
    except Exception as exc:  # the version is registered; only the amortisation is lost
        get_run_logger().warning("full-data statistics of %s failed: %s", weights["path"], exc)
        return None


def ensure_production(modality: Modality, params: Any) -> str:
    """The production version of the service's model, trained and registered first (an exact
    version on the prepared data minus any tombstones) when there is none."""
    uri, name = params.tracking.mlflow_uri, params.service.model_name
    current = registry.production_version(uri, name)
    if current is not None:
        return str(current.version)
    get_run_logger().info("no production version of %s: training the first one", name)
    return train_exact(modality, params, "first production version")["version"]


def _production_weights(modality: Modality, params: Any, version: str) -> dict[str, Any]:
    """Download (and verify) a version's weights under the artifacts directory; returns the
    weights dict the compute tasks take (path, digest)."""
    uri, name = params.tracking.mlflow_uri, params.service.model_name
    mv = registry.get_version(uri, name, version)
    dest = params.resolve(params.tracking.artifacts_dir) / "registry" / name / f"v{version}"
    path, _ = registry.download_version_weights(uri, name, version, dest)
    return {"path": str(path), "digest": mv.tags["state_digest"]}


def process_request(
    modality: Modality, params: Any, row: LedgerRow, ledger: Ledger
) -> dict[str, Any]:
    """Unlearn one claimed request from the current production version.

    Steps: resolve the request against the prepared data less the tombstones (its own DVC
    stage file) → the method's inputs on the parent's weights → unlearn → evaluate (the
    oracle per ``service.oracle``) → gates → tombstones appended (always: the ids are deleted
    whatever the gates say) → on pass a new *approximate* version whose tags name its parent,
    and the alias moves; on failure the fallback (``retrain``: an exact version;
    ``keep-parent``: the request is marked ``needs-retrain``). The ledger records the outcome.
    """
    logger = get_run_logger()
    svc, tr = params.service, params.tracking
    root = Path(tr.dvc_root).resolve()
    request = request_from_dict(row.content)
    rid = request.request_id
    parent_version = ensure_production(modality, params)
    t0 = time.perf_counter()  # the request's own time: not the first version's training
    parent = _production_weights(modality, params, parent_version)
    tomb_rel = tombstones_path(modality, params)
    exclude = tomb_rel if (root / tomb_rel).is_file() else None
    prepared, prepared_md5 = versioning.stage_prepare(modality, params, root)
    with tempfile.TemporaryDirectory() as tmp:
        request_file = _request_file(request, Path(tmp))
        versioning.validate_request(modality.name, request, str(root / prepared))
        manifests, manifests_md5 = versioning.stage_extract(
            modality, root, request, request_file, prepared, exclude
        )
    params = _staged_params(params, prepared, manifests)
    request_data = {
        "prepared_dir": str(root / prepared),
        "prepared_md5": prepared_md5,
        "manifests_dir": str(root / manifests),
        "manifests_md5": manifests_md5,
    }
    method = modality.get_method(params.unlearn.method)
    code = code_version()
    artifacts = str(params.resolve(tr.artifacts_dir))
    cfg = to_dict(params)
    run_id = tracking.start_run(
        tr.mlflow_uri,
        tr.experiment,
        rid,
        {
            "request_digest": request.digest,
            "method": method.name,
            "pipeline": modality.tag,
            "code_version": code,
            "request_reason": request.reason[:500],
            "service.model_name": svc.model_name,
            "service.parent_version": parent_version,
            "service.ledger_seq": str(row.seq),
        },
        str(root),
    )
    try:
        tracking.log_lineage(tr.mlflow_uri, run_id, modality.name, flatten(params), request_data)
        tracking.log_evidence(tr.mlflow_uri, run_id, request_data["manifests_dir"])
        needs = modality.method_needs(method, params)
        oracle = None
        if svc.evaluates_oracle(rid) or "oracle" in needs:
            oracle = with_files(
                oracle_task(root, tomb_rel, request_data),
                ("path",),
                modality.name,
                request_data,
                "oracle",
                modality.train_sections(cfg),
                params.train.oracle_seed,
                artifacts,
                code,
            )
        unlearned, fisher, unlearn_seconds = unlearn_with_inputs(
            modality, params, method, parent, oracle, request_data, run_id, artifacts, code
        )
        report_dir = params.resolve(params.evaluate.report_dir) / svc.model_name / rid
        weights = {
            "original": parent["path"],
            **({"oracle": oracle["path"]} if oracle else {}),
            "unlearned": unlearned["path"],
        }
        report = compute.evaluate(
            modality.name,
            request_data,
            params,
            weights,
            unlearn_seconds,
            oracle["seconds"] if oracle else 0.0,
            str(report_dir),
            {
                "title": f"{rid}: {method.name} from {svc.model_name} v{parent_version}",
                "request_id": rid,
                "method": method.name,
                "method_info": unlearned["info"],
                "mlflow_run_id": run_id,
                "parent_version": parent_version,
                **({"cost": request_cost_block(fisher, unlearned["seconds"])} if fisher else {}),
            },
        )
        gates = evaluate_gates(
            svc.gates, report["models"]["unlearned"], report["models"]["original"]
        )
        # The ids are deleted whatever the gates say: no later training may see them.
        man = load_manifests(request_data["manifests_dir"])
        tombs = append_tombstones(
            read_tombstones(root / tomb_rel), rid, man.forget_ids, datetime.now(UTC)
        )
        write_tombstones(tombs, root / tomb_rel)
        tomb_md5 = version_tombstones(str(root), tomb_rel)
        lineage.index_forgotten(ledger, svc.model_name, rid, tombs, man.forget_ids)
        tags = {
            "service.gates": gates.summary(),
            "service.gates_passed": str(gates.passed).lower(),
            "tombstones.md5": tomb_md5,
            "tombstones.count": str(tombs.num_rows),
            "n_forget": str(len(man.forget_ids)),
        }
        produced = None
        status, reason = "done", "unlearned; gates passed"
        if gates.passed:
            produced = registry.register_version(
                tr.mlflow_uri,
                svc.model_name,
                unlearned["path"],
                _arch_config(modality, params, request_data["prepared_dir"]),
                run_id,
                {
                    "kind": "approximate",
                    "parent_version": parent_version,
                    "request_ids": [rid],
                    "method": method.name,
                    "state_digest": unlearned["digest"],
                    "data_version": prepared_md5,
                    "manifests_md5": manifests_md5,
                    "tombstones_md5": tomb_md5,
                    "gates": gates.summary(),
                },
                set_production=True,
            )
        elif gates.fallback == "retrain":
            logger.warning("%s: gates failed (%s): exact retrain", rid, gates.summary())
            produced = train_exact(modality, params, f"gates failed for {rid}")["version"]
            reason = f"gates failed ({gates.summary()}); exact retrain"
        else:
            logger.warning("%s: gates failed (%s): parent kept", rid, gates.summary())
            status, reason = "needs-retrain", f"gates failed: {gates.summary()}"
        tags["service.produced_version"] = produced or ""
        tracking.set_tags(tr.mlflow_uri, run_id, tags)
        extra = {
            "time.oracle_train_seconds": oracle["seconds"] if oracle else float("nan"),
            "time.method_seconds": unlearned["seconds"],
            **(fisher_metrics(fisher) if fisher else {}),
            **{
                f"method.{k}": float(v)
                for k, v in unlearned["info"].items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            },
        }
        roles = {
            "original": parent,
            "unlearned": unlearned,
            **({"oracle": oracle} if oracle else {}),
        }
        tracking.log_results(tr.mlflow_uri, run_id, report, roles, str(report_dir), extra)
        lineage.write_certificate(
            tr.mlflow_uri, run_id, str(report_dir), {"status": status, "reason": reason}
        )
    except BaseException:
        tracking.end_run(tr.mlflow_uri, run_id, "FAILED")
        raise
    tracking.end_run(tr.mlflow_uri, run_id, "FINISHED")
    ledger.transition(
        rid,
        status,
        reason,
        mlflow_run_id=run_id,
        parent_version=parent_version,
        produced_version=produced,
    )
    logger.info(
        "%s: %s (parent v%s -> %s); %s",
        rid,
        status,
        parent_version,
        f"v{produced}" if produced else "no new version",
        modality.summary_line(report),
    )
    return {
        "request_id": rid,
        "status": status,
        "parent_version": parent_version,
        "produced_version": produced,
        "run_id": run_id,
        "report": report,
        "report_dir": str(report_dir),
        "gates": gates.summary(),
        "seconds": time.perf_counter() - t0,
        # the new version's full-data statistics: the amortised cost, after the request
        "full_statistics": (
            version_statistics(modality, params, unlearned, man.retain_ids)
            if gates.passed
            else None
        ),
    }


def oracle_task(root: Path, tomb_rel: str, request_data: dict[str, str]) -> Any:
    """The training task of a request's oracle, cached per *tombstone set*: the oracle is
    trained on the data minus every id forgotten so far (this request's included), so its
    cache key is the prepared data's md5, the digest of that id set, the sections, the seed
    and the code, and not the request. Any request that leaves the same ids out reuses it."""
    import hashlib

    man = load_manifests(request_data["manifests_dir"])
    after = append_tombstones(
        read_tombstones(root / tomb_rel), "oracle", man.forget_ids, datetime.now(UTC)
    )
    gone = tombstone_digest(after)  # sha256 of the sorted ids only

    def key(context: Any, parameters: dict[str, Any]) -> str:
        body = json.dumps(
            [
                parameters["modality"],
                parameters["data"]["prepared_md5"],
                gone,
                parameters["role"],
                parameters["sections"],
                parameters["seed"],
                parameters["artifacts_dir"],
                parameters["code"],
            ],
            sort_keys=True,
        )
        return "oracle-" + hashlib.sha256(body.encode()).hexdigest()

    # cache_policy, not cache_key_fn=: the records stay JSON-only (tasks/results.py)
    return compute.train_model.with_options(cache_policy=keyed(key))


def is_input_error(exc: BaseException) -> bool:
    """A request that does not fit the data (unknown ids, a missing class, everything
    forgotten already): rejected rather than failed."""
    return isinstance(exc, RequestError | versioning.StageFailed)
