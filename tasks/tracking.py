"""MLflow edge: one parent run per pipeline run, named after the request id.

Lineage recorded on the run: the flattened params; the prepared data and the forget/retain
manifests as dataset inputs (MLflow digest over the id table, the source path, and tags with
the DVC md5 and the full content hash); tags with the request digest, code version and git
commit; the original, oracle and unlearned weights (safetensors), every metric, the report
and the plot. ``search_runs(filter_string="tags.request_id = '...'")`` answers "which data
version and model did this come from" after the fact.

Every run we create carries the host, pid and start time of the process that created it
(``unlearnflow.host``/``.pid``/``.process_started``). A process that is stopped by SIGTERM or
SIGINT closes its open runs as KILLED (:func:`end_run`, :func:`close_active_runs`); one that
dies without a chance to (SIGKILL, a crash, a lost machine) leaves them RUNNING, and the next
process of this host that starts a run closes those as FAILED with an ``unlearnflow.note``
(:func:`close_stale_runs`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from prefect import task

from pipeline_lib.data.requests import load_manifests

RETRY = dict(retries=2, retry_delay_seconds=2)

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, STARTED_TAG = (
    "unlearnflow.host",
    "unlearnflow.pid",
    "unlearnflow.process_started",
)
NOTE_TAG = "unlearnflow.note"

#: Runs this process started and has not ended: run id -> tracking URI.
_ACTIVE: dict[str, str] = {}
#: Tracking URIs whose stale runs this process has already closed.
_SWEPT: set[str] = set()
#: Set (to the signal's name) once this process was asked to stop by SIGTERM or SIGINT.
_INTERRUPTED: list[str] = []


class DuplicateRequest(ValueError):
    """The request id was already used for a different request."""


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


#: Experiment tag that names an experiment's kind (model training) for MLflow 3. The UI of
#: MLflow 3.17 does not choose its view from it: the view follows the URL parameter
#: ``workflowType`` or, without one, the browser's stored choice (default GenAI). Links with
#: ``workflowType=machine_learning``: :func:`tasks.lineage.ui_url`.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=EXPERIMENT_KIND)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)  # created by a concurrent run
            assert exp is not None
    if "mlflow.experimentKind" not in exp.tags:  # created before the tag existed
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run this code runs in (id and UI URL), as MLflow run tags; empty
    outside a flow. The URL needs ``PREFECT_UI_URL`` (set for a Prefect server)."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    run_id = flow_run.get_id()
    if not run_id:
        return {}
    tags = {"prefect.flow_run_id": str(run_id)}
    name = flow_run.get_name()
    if name:
        tags["prefect.flow_run_name"] = str(name)
    if PREFECT_UI_URL.value():
        tags["prefect.flow_run_url"] = str(flow_run.get_flow_run_ui_url())
    return tags


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _process_started(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), or None when no such
    process is running (a zombie counts as gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # another user's live process
        return float("nan")


def process_tags() -> dict[str, str]:
    """Host, pid and process start time of this process, as run tags."""
    started = _process_started(os.getpid())
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: f"{started:.3f}" if started is not None else "",
    }


def _owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process that created a run (by its tags) still runs. A pid now used by a
    process started at another time is a different process: the owner is gone."""
    try:
        pid = int(tags[PID_TAG])
    except (KeyError, ValueError):
        return True  # not ours to judge
    started = _process_started(pid)
    if started is None:
        return False
    recorded = tags.get(STARTED_TAG, "")
    if not recorded or started != started:  # no start time recorded, or not readable
        return True
    return abs(float(recorded) - started) < 1.0


def close_stale_runs(uri: str) -> list[str]:
    """Close as FAILED, with a note, every RUNNING run (any experiment) created on this host by
    a process that is no longer running (killed by SIGKILL, crashed, or its machine was
    reset). Runs from other hosts, and runs without our host/pid tags, are left alone.
    Returns the ids of the runs closed."""
    client = client_for(uri)
    host = socket.gethostname()
    exps = [e.experiment_id for e in client.search_experiments()]
    closed = []
    for i in range(0, len(exps), 100):
        runs = client.search_runs(
            exps[i : i + 100],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=1000,
        )
        for run in runs:
            tags = run.data.tags
            if run.info.run_id in _ACTIVE or _owner_alive(tags):
                continue
            note = (
                f"closed as FAILED by pid {os.getpid()} on {host} at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: the process that ran it "
                f"(pid {tags.get(PID_TAG)}) ended without closing it (killed or crashed)"
            )
            client.set_tag(run.info.run_id, NOTE_TAG, note)
            client.set_terminated(run.info.run_id, status="FAILED")
            log.warning("MLflow run %s: %s", run.info.run_id, note)
            closed.append(run.info.run_id)
    return closed


def _sweep_stale(uri: str) -> None:
    """:func:`close_stale_runs` once per tracking URI and process, before its first run;
    a failure to clean up never stops the work."""
    if uri in _SWEPT:
        return
    _SWEPT.add(uri)
    try:
        close_stale_runs(uri)
    except Exception as exc:  # noqa: BLE001 - housekeeping only
        log.warning("could not close stale MLflow runs in %s: %s", uri, exc)


def create_run(
    client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]
) -> str:
    """Create a run (status RUNNING) tagged with this process (:func:`process_tags`) and
    remember it as open until :func:`end_run`. First closes the runs that dead processes left
    RUNNING on this host. Returns the run id."""
    uri = client.tracking_uri
    _sweep_stale(uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **process_tags()})
    _ACTIVE[run.info.run_id] = uri
    return run.info.run_id


def check_request_id(uri: str, experiment: str, request_id: str, request_digest: str) -> None:
    """Refuse a request id already used in this experiment for different request content."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.request_id = '{request_id}'"
    )
    for run in runs:
        if run.data.tags.get("request_digest") not in (None, request_digest):
            raise DuplicateRequest(
                f"duplicate request_id {request_id!r}: run {run.info.run_id} already processed a "
                "different request under this id; give the new request its own id"
            )


@task(name="mlflow-start-run", **RETRY)
def start_run(
    uri: str, experiment: str, request_id: str, tags: dict[str, str], dvc_root: str
) -> str:
    """Create the parent run (status RUNNING) and return its id."""
    client = client_for(uri)
    commit = _git_commit(Path(dvc_root))
    return create_run(
        client,
        _experiment_id(client, experiment),
        request_id,
        {
            **prefect_tags(),
            **tags,
            "request_id": request_id,
            **({"mlflow.source.git.commit": commit} if commit else {}),
        },
    )


EVIDENCE_DIR = "evidence"


@task(name="mlflow-log-evidence", **RETRY)
def log_evidence(uri: str, run_id: str, manifests_dir: str) -> dict[str, str]:
    """The request's durable evidence on its run, so lineage never needs the local DVC
    cache: ``evidence/forget_ids.parquet`` (the forgotten ids), ``evidence/request.json``
    (the resolved request), ``evidence/retain_ids.json`` (the retain ids' count and sha256:
    a digest, not the list); tags ``forget_ids.count``/``.sha256`` and
    ``retain_ids.count``/``.sha256``. Returns the tags."""
    import json
    import tempfile

    from pipeline_lib.service.evidence import ids_digest

    man = load_manifests(manifests_dir)
    tags = {
        "forget_ids.count": str(len(man.forget_ids)),
        "forget_ids.sha256": ids_digest(man.forget_ids),
        "retain_ids.count": str(len(man.retain_ids)),
        "retain_ids.sha256": ids_digest(man.retain_ids),
    }
    client = client_for(uri)
    src = Path(manifests_dir)
    with tempfile.TemporaryDirectory(prefix="unlearnflow-evidence-") as tmp:
        staging = Path(tmp)
        for name in ("forget_ids.parquet", "request.json"):
            (staging / name).write_bytes((src / name).read_bytes())
        (staging / "retain_ids.json").write_text(
            json.dumps(
                {
                    "count": len(man.retain_ids),
                    "sha256": tags["retain_ids.sha256"],
                    "encoding": "sha256 of the sorted ids as a compact JSON list",
                },
                indent=2,
            )
            + "\n"
        )
        client.log_artifacts(run_id, str(staging), artifact_path=EVIDENCE_DIR)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])
    return tags


def _dataset_input(
    df: pd.DataFrame, source: str, name: str, context: str, tags: dict[str, str]
) -> DatasetInput:
    ds = mlflow.data.from_pandas(df, source=source, name=name)
    all_tags = {"mlflow.data.context": context, **tags}
    return DatasetInput(ds._to_mlflow_entity(), [InputTag(k, str(v)) for k, v in all_tags.items()])


def log_dataset_lineage(
    uri: str,
    run_id: str,
    flat_params: dict[str, Any],
    data: dict[str, str],
    table: pd.DataFrame,
    dataset: str,
    content_hash: str,
    id_column: str = "sample_id",
) -> None:
    """Params; the prepared data (``table`` of its ids) and the forget/retain manifests as
    dataset inputs tagged with their DVC md5s; content hash and md5s as run tags. Shared by
    the image and the language-model pipelines."""
    client = client_for(uri)
    params = [Param(k, str(v)[:6000]) for k, v in sorted(flat_params.items())]
    client.log_batch(run_id, params=params)
    man = load_manifests(data["manifests_dir"])
    inputs = [
        _dataset_input(
            table,
            str(Path(data["prepared_dir"]).resolve()),
            f"{dataset}-prepared",
            "training",
            {"dvc_md5": data["prepared_md5"], "content_hash": content_hash},
        ),
    ]
    for split, ids in (("forget", man.forget_ids), ("retain", man.retain_ids)):
        inputs.append(
            _dataset_input(
                pd.DataFrame({id_column: ids}),
                str(Path(data["manifests_dir"]).resolve() / f"{split}_ids.parquet"),
                f"{man.summary['request']['request_id']}-{split}",
                split,
                {"dvc_md5": data["manifests_md5"], "request_digest": man.summary["request_digest"]},
            )
        )
    client.log_inputs(run_id, datasets=inputs)
    client.log_batch(
        run_id,
        tags=[
            RunTag("data_content_hash", content_hash),
            RunTag("dvc.prepared_md5", data["prepared_md5"]),
            RunTag("dvc.manifests_md5", data["manifests_md5"]),
        ],
    )


@task(name="mlflow-log-lineage", **RETRY)
def log_lineage(
    uri: str, run_id: str, modality: str, flat_params: dict[str, Any], data: dict[str, str]
) -> None:
    """Params, and the prepared data (its ids table, from the modality) and the manifests as
    dataset inputs with DVC md5 tags."""
    from pipeline_lib.modalities import get_modality

    table, dataset, content_hash, id_column = get_modality(modality).lineage_table(
        data["prepared_dir"]
    )
    log_dataset_lineage(
        uri, run_id, flat_params, data, table, dataset, content_hash, id_column=id_column
    )


def artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from a free name."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{name}".lower()))[:60].strip(
        "-"
    )


def markdown_table(report: dict[str, Any], columns: tuple[str, ...], digits: int) -> str:
    """A report's summary table and cost line as Markdown (a Prefect artifact)."""
    head = "| model | " + " | ".join(columns) + " |"
    sep = "|---" * (len(columns) + 1) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{m[c]:.{digits}f}" for c in columns) + " |"
        for name, m in report["models"].items()
    ]
    cost = report["cost"]
    return "\n".join(
        [
            head,
            sep,
            *rows,
            "",
            f"unlearning {cost['unlearn_seconds']:.2f}s, retraining {cost['retrain_seconds']:.2f}s, "
            f"ratio {cost['unlearn_over_retrain']:.{digits}f}",
        ]
    )


def _numeric(d: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}{k}": float(v)
        for k, v in d.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


@task(name="mlflow-log-results", **RETRY)
def log_results(
    uri: str,
    run_id: str,
    report: dict[str, Any],
    weights: dict[str, dict[str, Any]],
    report_dir: str,
    extra_metrics: dict[str, float],
) -> None:
    """Metrics of every model, cost, weights (safetensors) and the report files."""
    client = client_for(uri)
    metrics: dict[str, float] = {}
    for model_name, m in report["models"].items():
        metrics.update(_numeric(m, f"{model_name}."))
    metrics.update(_numeric(report["cost"], "cost."))
    metrics.update(extra_metrics)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())],
        tags=[RunTag(f"weights.{role}.digest", w["digest"]) for role, w in weights.items()],
    )
    for w in weights.values():
        client.log_artifact(run_id, w["path"], artifact_path="models")
    for name in ("report.json", "report.png"):
        client.log_artifact(run_id, str(Path(report_dir) / name), artifact_path="report")


@task(name="mlflow-log-store", **RETRY)
def log_store(
    uri: str,
    run_id: str,
    spec: dict[str, Any],
    stats: dict[str, Any],
    lds: dict[str, float],
    manifest: str,
) -> None:
    """Spec as params, throughput and LDS as metrics, per-chunk timing as metric series
    (step = chunk index), the masks digest as a tag, the store manifest as an artifact."""
    client = client_for(uri)
    params = {f"store.{k}": v for k, v in spec.items() if not isinstance(v, dict)}
    params.update({f"store.model.{k}": v for k, v in spec["model"].items()})
    params.update({f"store.train.{k}": v for k, v in spec["train"].items()})
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(stats[k]), now, 0)
        for k in (
            "wall_seconds",
            "models_trained",
            "models_per_second",
            "overhead_fraction",
            "trainer_seconds",
        )
        if k in stats
    ]
    metrics += [Metric(k, float(v), now, 0) for k, v in lds.items()]
    for i, chunk in enumerate(sorted(stats.get("chunks", []), key=lambda c: c["start"])):
        metrics.append(Metric("chunk.train_seconds", float(chunk["train_seconds"]), now, i))
        metrics.append(
            Metric(
                "chunk.models_per_second",
                (chunk["stop"] - chunk["start"]) / max(chunk["train_seconds"], 1e-9),
                now,
                i,
            )
        )
    for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i : i + 900])
    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
        tags=[
            RunTag("masks_digest", stats.get("masks_digest", "")),
            RunTag("ray.nodes", ",".join(stats.get("nodes", []))),
        ],
    )
    client.log_artifact(run_id, manifest, artifact_path="store")


@task(name="mlflow-set-tags", **RETRY)
def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client_for(uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())])


def mark_interrupted(signal_name: str) -> None:
    """Record that this process was asked to stop (by the CLI's SIGTERM/SIGINT handler): a
    run that ends FAILED from now on ends KILLED."""
    if not _INTERRUPTED:
        _INTERRUPTED.append(signal_name)


def _interrupted() -> bool:
    """Whether the run is ending because the process is being stopped: after
    :func:`mark_interrupted`, or while a KeyboardInterrupt (SIGINT) or Prefect's
    TerminationSignal (SIGTERM during a flow run) is being handled."""
    from prefect.exceptions import TerminationSignal

    return bool(_INTERRUPTED) or isinstance(
        sys.exc_info()[1], KeyboardInterrupt | TerminationSignal
    )


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close a run. A run that would end FAILED because the process was interrupted ends
    KILLED instead (the work was stopped, it did not fail)."""
    if status == "FAILED" and _interrupted():
        status = "KILLED"
    client_for(uri).set_terminated(run_id, status=status)
    _ACTIVE.pop(run_id, None)


def close_active_runs(status: str = "KILLED") -> list[str]:
    """Close every run this process started and has not ended (the CLI calls this when it is
    interrupted, for runs whose flow had no chance to). Returns their ids."""
    closed = []
    for run_id, uri in list(_ACTIVE.items()):
        try:
            client_for(uri).set_terminated(run_id, status=status)
            closed.append(run_id)
        except Exception as exc:  # noqa: BLE001 - best effort while stopping
            log.warning("could not close MLflow run %s as %s: %s", run_id, status, exc)
        _ACTIVE.pop(run_id, None)
    return closed


@task(name="mlflow-log-comparison", **RETRY)
def log_comparison(
    uri: str,
    experiment: str,
    parent_id: str,
    rows: list[dict[str, Any]],
    method_params: dict[str, dict[str, Any]],
    floor: dict[str, dict[str, float]],
    files: list[str],
    tags: dict[str, str],
) -> dict[str, str]:
    """One child run per table row (method), nested under ``parent_id``: its numeric fields as
    metrics, its hyper-parameters as params. The parent gets the noise floor as metrics and
    the table (Markdown, CSV) and plots as artifacts. Returns {method: child run id}."""
    client = client_for(uri)
    exp_id = _experiment_id(client, experiment)
    now = int(time.time() * 1000)
    children = {}
    for row in rows:
        name = row["method"]
        child_id = create_run(
            client,
            exp_id,
            f"{tags.get('request_id', 'evaluation')}/{name}",
            {
                **tags,
                "mlflow.parentRunId": parent_id,
                "kind": "evaluation-method",
                "method": name,
            },
        )
        params = method_params.get(name, {})
        client.log_batch(
            child_id,
            metrics=[Metric(k, v, now, 0) for k, v in sorted(_numeric(row, "").items())],
            params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
        )
        end_run(uri, child_id, "FINISHED")
        children[name] = child_id
    floor_metrics = {
        f"noise_floor.{split}.{stat}": v for split, d in floor.items() for stat, v in d.items()
    }
    client.log_batch(
        parent_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(floor_metrics.items())]
    )
    for path in files:
        client.log_artifact(parent_id, path, artifact_path="comparison")
    return children


@task(name="mlflow-log-statistics", **RETRY)
def log_statistics(
    uri: str, experiment: str, request_id: str, result: dict[str, Any], data: dict[str, str]
) -> str:
    """One finished run ``stats-<statistic>-<split>-<request id>`` for ``unlearn stats``: the
    statistic's identity and settings as params, samples/shards/workers/seconds as metrics,
    the weights digest, data hash, ids digest, content hash and DVC md5s as tags, and a small
    ``statistics.json`` artifact pointing at the file (the tensors are not copied)."""
    client = client_for(uri)
    identity = result["identity"]
    run_id = create_run(
        client,
        _experiment_id(client, experiment),
        f"stats-{result['statistic']}-{result['split']}-{request_id}",
        {
            "kind": "statistics",
            "stats.request_id": request_id,
            "stats.statistic": result["statistic"],
            "stats.split": result["split"],
            "stats.reused": str(bool(result["reused"])).lower(),
            "stats.content_hash": result["digest"],
            "stats.path": result["path"],
            "weights.original.digest": identity["weights_digest"],
            "data_content_hash": identity["data_content_hash"],
            "stats.ids_digest": identity["ids_digest"],
            "dvc.prepared_md5": data["prepared_md5"],
            "dvc.manifests_md5": data["manifests_md5"],
        },
    )
    now = int(time.time() * 1000)
    params = {f"identity.{k}": v for k, v in identity.items() if not k.endswith(("digest", "hash"))}
    metrics = {
        k: float(result[k])
        for k in ("n", "shards", "workers", "seconds", "wall_seconds", "samples_per_second")
        if isinstance(result.get(k), int | float) and not isinstance(result.get(k), bool)
    }
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())],
        params=[Param(k, str(v)) for k, v in sorted(params.items())],
    )
    pointer = {k: result[k] for k in ("path", "digest", "n", "reused") if k in result}
    client.log_dict(run_id, {**pointer, "identity": identity}, "statistics.json")
    end_run(uri, run_id, "FINISHED")
    return run_id
