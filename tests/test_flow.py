"""End-to-end: the whole pipeline on tiny digits through a real temporary Prefect API, a real
MLflow SQLite store and a real DVC repo in a temp dir; then the run is read back from MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_dvc_project

REQUEST = {
    "request_id": "req-test-0001",
    "reason": "test erasure",
    "forget": {"fraction": 0.1, "seed": 3},
}


def tiny_params(root: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_train=300, max_test=120)
    params["train"].update(epochs=4)
    params["unlearn"]["fisher_diagonal"].update(epochs=2)
    params["request"]["file"] = "requests/req.yaml"
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment="flow-test",
        dvc_root=str(root),
        artifacts_dir="artifacts",
    )
    return params


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(tiny_params(tmp_path / "proj")))
    (root / "requests" / "req.yaml").write_text(yaml.safe_dump(REQUEST))
    return root


def _task_states(flow_run_id) -> dict[str, list[str]]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    states: dict[str, list[str]] = {}
    for run in runs:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return states


def test_pipeline_end_to_end(prefect_api, project: Path):
    from mlflow import MlflowClient

    from flows.pipeline import unlearning_pipeline

    params_path = str(project / "params.yaml")
    state = unlearning_pipeline(params_path=params_path, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["run_id"])

    # one parent run named after the request, finished, with lineage tags
    assert run.info.run_name == "req-test-0001"
    assert run.info.status == "FINISHED"
    assert run.data.tags["request_id"] == "req-test-0001"
    assert run.data.params["train.epochs"] == "4"
    assert run.data.params["unlearn.method"] == "fisher_diagonal"

    # dataset inputs carry the DVC md5s that the lock files hold: the data's in dvc.lock, the
    # request's in its own run directory's lock
    params_before = (project / "params.yaml").read_text()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    run_dir = project / "runs" / "image" / "req-test-0001"
    req_lock = yaml.safe_load((run_dir / "dvc.lock").read_text())
    manifests_md5 = req_lock["stages"]["extract"]["outs"][0]["md5"]
    inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
    assert inputs["digits-prepared"]["dvc_md5"] == prepared_md5
    assert inputs["req-test-0001-forget"]["dvc_md5"] == manifests_md5
    assert inputs["req-test-0001-retain"]["mlflow.data.context"] == "retain"
    assert run.data.tags["dvc.prepared_md5"] == prepared_md5

    # the manifests hold ids only, and the forget count matches the request
    summary = json.loads((run_dir / "manifests" / "request.json").read_text())
    assert summary["n_forget"] == 30 and summary["n_retain"] == 270

    # artifacts: three safetensors weights, the report and its plot
    models = [a.path for a in client.list_artifacts(run.info.run_id, "models")]
    assert len(models) == 3 and all(p.endswith(".safetensors") for p in models)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {
        "report/report.json",
        "report/report.png",
    }

    # metrics: every model's accuracies, gap to the oracle, cost ratio
    m = run.data.metrics
    assert m["oracle.avg_gap"] == 0.0
    assert 0.0 <= m["unlearned.forget_acc"] <= 100.0
    assert m["cost.retrain_seconds"] > 0 and m["cost.unlearn_over_retrain"] > 0
    assert m["method.n_reset"] > 0
    report = result["report"]
    assert m["unlearned.TA"] == pytest.approx(report["models"]["unlearned"]["TA"])

    # `dvc repro` by hand afterwards has nothing to do: the flow ran the same stages
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr

    # a second run with unchanged inputs is served from the cache
    state2 = unlearning_pipeline(params_path=params_path, return_state=True)
    assert state2.is_completed()
    states = _task_states(state2.state_details.flow_run_id)
    assert states["train-model"] == ["Cached", "Cached"], states
    assert states["unlearn"] == ["Cached"], states
    # the Fisher statistics were computed once and found again by the second run
    assert m["stats.fisher_forget_reused"] == 0 and m["stats.fisher_retain_reused"] == 0
    m2 = client.get_run(state2.result()["run_id"]).data.metrics
    assert m2["stats.fisher_forget_reused"] == 1 and m2["stats.fisher_retain_reused"] == 1
    assert m2["time.fisher_seconds"] == pytest.approx(m["time.fisher_seconds"])
    stats_files = sorted((project / "artifacts" / "stats").glob("fisher-*.safetensors"))
    assert len(stats_files) == 2
    assert run.data.tags["stats.fisher_forget.path"] in map(str, stats_files)
    assert state2.result()["report"]["models"] == report["models"]
    runs = client.search_runs(
        [run.info.experiment_id], filter_string="tags.request_id = 'req-test-0001'"
    )
    assert len(runs) == 2

    # a new request id reuses the original model (request-independent) but retrains the oracle
    other = dict(REQUEST, request_id="req-test-0002", forget={"classes": [3]})
    (project / "requests" / "other.yaml").write_text(yaml.safe_dump(other))
    state3 = unlearning_pipeline(
        params_path=params_path,
        overrides={"request.file": "requests/other.yaml", "unlearn.method": "finetune"},
        return_state=True,
    )
    assert state3.is_completed()
    states3 = _task_states(state3.state_details.flow_run_id)
    assert sorted(states3["train-model"]) == ["Cached", "Completed"], states3
    assert "fisher-statistics" not in states3  # finetune needs no Fisher statistics
    # no run rewrote the params file; each request has its own DVC record and `dvc status`
    # of it is clean
    assert (project / "params.yaml").read_text() == params_before
    assert (project / "runs" / "image" / "req-test-0002" / "dvc.lock").is_file()
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "runs/image/req-test-0001/dvc.yaml"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def test_bad_request_fails_before_training(prefect_api, project: Path):
    from flows.pipeline import unlearning_pipeline
    from tasks.tracking import DuplicateRequest

    bad = dict(REQUEST, request_id="req-bad", forget={"sample_ids": ["nope-1"]})
    (project / "requests" / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="unknown sample id"):
        unlearning_pipeline(
            params_path=str(project / "params.yaml"),
            overrides={"request.file": "requests/bad.yaml"},
        )
    assert not (project / "artifacts").exists()  # nothing trained

    # a request id reused for different content is refused
    unlearning_pipeline(
        params_path=str(project / "params.yaml"), overrides={"unlearn.method": "finetune"}
    )
    changed = dict(REQUEST, forget={"fraction": 0.2, "seed": 3})
    (project / "requests" / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(DuplicateRequest, match="req-test-0001"):
        unlearning_pipeline(
            params_path=str(project / "params.yaml"),
            overrides={"request.file": "requests/changed.yaml"},
        )


def test_pipeline_runs_dmm_training_the_store_once(prefect_api, project: Path, caplog):
    """`unlearn run --method dmm`: the first request trains the subset models on Ray, a second
    request with another forget set reuses them; the DMM fine-tuning reduced the error to its
    DM-Direct targets, and MLflow holds the method's figures. The second selects a preset
    tuned with another number of subset models: the run says so in its log; it also takes
    the anchor from reference models (``unlearn.dmm.anchor_models``), trained into their own
    store."""
    import logging

    import ray
    from mlflow import MlflowClient

    from flows.pipeline import unlearning_pipeline
    from pipeline_lib.attribution.store import AttributionStore

    overrides = {
        "unlearn.method": "dmm",
        "attribution.n_models": 24,
        "attribution.chunk_size": 12,
        "unlearn.dmm.epochs": 20,
        "ray.num_cpus": 2,
    }
    try:
        first = unlearning_pipeline(str(project / "params.yaml"), overrides)
        stores = list((project / "artifacts" / "attribution").glob("subsets-*"))
        assert len(stores) == 1
        store = AttributionStore.open(stores[0])
        store.check()
        written = (store.manifest_path.stat().st_mtime_ns, store.masks_digest())
        req2 = {**REQUEST, "request_id": "req-test-0002", "forget": {"fraction": 0.05, "seed": 9}}
        (project / "requests" / "req2.yaml").write_text(yaml.safe_dump(req2))
        from pipeline_lib.config.presets import write_preset

        write_preset(
            project / "presets" / "digits-mlp" / "dmm.yaml",
            {
                "preset": "digits-mlp",
                "method": "dmm",
                "dataset": "digits",
                "model": "mlp",
                "params": {"epochs": 20},
                "tuning": {"subset_models": 2000},
            },
            overwrite=False,
        )
        # Prefect's run loggers do not propagate: listen on them directly
        run_loggers = [logging.getLogger(f"prefect.{n}") for n in ("flow_runs", "task_runs")]
        for lg in run_loggers:
            lg.addHandler(caplog.handler)
        try:
            with caplog.at_level(logging.WARNING):
                second = unlearning_pipeline(
                    str(project / "params.yaml"),
                    {
                        **overrides,
                        "unlearn.preset": "digits-mlp",
                        "request.file": str(project / "requests" / "req2.yaml"),
                        # the anchor from 2 reference models trained on D
                        "unlearn.dmm.anchor_models": 2,
                    },
                )
        finally:
            for lg in run_loggers:
                lg.removeHandler(caplog.handler)
    finally:
        ray.shutdown()
    assert any(
        "tuned with 2000 subset models" in r.getMessage() and "has 24" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert (store.manifest_path.stat().st_mtime_ns, store.masks_digest()) == written
    refs = list((project / "artifacts" / "attribution").glob("originals-*"))
    assert len(refs) == 1
    ref = AttributionStore.open(refs[0])
    assert (ref.spec.kind, ref.spec.n_models, ref.spec.seed) == ("originals", 2, 300)
    ref.check()
    for result in (first, second):
        info = result["report"]["method_info"]
        assert info["mse_forget_after"] < info["mse_forget_before"]
        assert info["n_matching_points"] > 0 and info["target_seconds"] > 0
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(second["run_id"])
    assert run.data.tags["method"] == "dmm"
    assert run.data.metrics["method.mse_forget_after"] == pytest.approx(
        second["report"]["method_info"]["mse_forget_after"]
    )


def test_artifact_keys_are_valid_for_any_request_id():
    from tasks.tracking import artifact_key

    assert artifact_key("report", "Req_2024.11/A b") == "report-req-2024-11-a-b"
    assert len(artifact_key("evaluate", "x" * 200)) <= 60
