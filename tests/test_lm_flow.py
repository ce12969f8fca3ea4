"""End-to-end LM pipeline: the `unlearn run --params params-lm.yaml` flow on a tiny GPT-2 and
two plays, through a real temporary Prefect API, a real MLflow SQLite store and a real DVC
repo (lm/dvc.yaml) in a temp dir; the run is read back from MLflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, make_dvc_project

pytestmark = pytest.mark.usefixtures("one_thread")

REQUEST = {
    "request_id": "req-lm-test-0001",
    "reason": "test erasure of a play",
    "forget": {"groups": ["the-tempest"]},
}


def tiny_lm_params(root: Path) -> dict:
    params = yaml.safe_load((REPO / "params-lm.yaml").read_text())
    params["text"].update(plays=["macbeth", "the-tempest"], max_doc_chars=160)
    params["lm"].update(n_layer=1, n_embd=32, n_head=2, n_positions=48)
    params["train"].update(epochs=12, batch_size=16, lr=0.01)
    params["evaluate"].update(prefix_tokens=16, continuation_tokens=8, prefixes_per_doc=2)
    params["unlearn"]["gradient_ascent"].update(lr=0.5)
    params["request"]["file"] = "requests/req.yaml"
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment="lm-flow-test",
        dvc_root=str(root),
        artifacts_dir="artifacts",
    )
    return params


@pytest.fixture
def lm_project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    make_dvc_project(root, (REPO / "params.yaml").read_text())
    (root / "lm").mkdir()
    shutil.copy(REPO / "lm" / "dvc.yaml", root / "lm" / "dvc.yaml")
    (root / "params-lm.yaml").write_text(yaml.safe_dump(tiny_lm_params(root)))
    (root / "requests" / "req.yaml").write_text(yaml.safe_dump(REQUEST))
    return root


def test_lm_pipeline_end_to_end(prefect_api, lm_project: Path):
    from mlflow import MlflowClient

    from flows.pipeline import unlearning_pipeline as lm_unlearning_pipeline

    params_path = str(lm_project / "params-lm.yaml")
    state = lm_unlearning_pipeline(params_path=params_path, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    client = MlflowClient(tracking_uri=f"sqlite:///{lm_project / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "req-lm-test-0001" and run.info.status == "FINISHED"
    assert run.data.tags["pipeline"] == "lm"
    assert run.data.params["unlearn.method"] == "gradient_ascent"

    # DVC: the LM stages ran; their md5s are on the run's dataset inputs
    lock = yaml.safe_load((lm_project / "lm" / "dvc.lock").read_text())
    prepared_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    run_dir = lm_project / "runs" / "text" / "req-lm-test-0001"
    req_lock = yaml.safe_load((run_dir / "dvc.lock").read_text())
    manifests_md5 = req_lock["stages"]["extract"]["outs"][0]["md5"]
    inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
    assert inputs["shakespeare-prepared"]["dvc_md5"] == prepared_md5
    assert inputs["req-lm-test-0001-forget"]["dvc_md5"] == manifests_md5
    summary = json.loads((run_dir / "manifests" / "request.json").read_text())
    assert summary["dataset"] == "shakespeare" and summary["n_forget"] > 0
    forget_ids = json.dumps(summary)  # ids only: manifests name documents, hold no text
    assert "Tempest" not in forget_ids

    # artifacts and metrics in the image pipeline's format
    models = [a.path for a in client.list_artifacts(run.info.run_id, "models")]
    assert len(models) == 3 and all(p.endswith(".safetensors") for p in models)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {
        "report/report.json",
        "report/report.png",
    }
    m = run.data.metrics
    assert m["oracle.avg_gap"] == 0.0 and m["oracle.ppl_forget_gap"] == 0.0
    for role in ("original", "oracle", "unlearned"):
        for k in ("ppl_forget", "ppl_retain", "ppl_heldout"):
            assert m[f"{role}.{k}"] > 1.0
        assert 0.0 <= m[f"{role}.memorization_rate"] <= 1.0
        assert 0.0 <= m[f"{role}.loss_MIA_AUC"] <= 1.0
    # calibrated ascent: the forget loss ends at the target (original's held-out loss), above
    # where it started
    assert m["method.reached_target"] == 1.0
    assert m["method.final_forget_loss"] == pytest.approx(m["method.target_loss"], rel=0.02)
    assert m["unlearned.ppl_forget"] > m["original.ppl_forget"]
    assert m["cost.unlearn_over_retrain"] > 0
    # per-forget-document influence scores of every model are in the report (and its plot)
    report = json.loads((Path(result["report_dir"]) / "report.json").read_text())
    infl = report["influence"]
    assert len(infl["doc_ids"]) == summary["n_forget"] and set(infl["scores"]) == {
        "original",
        "oracle",
        "unlearned",
    }
    assert all(len(v) == len(infl["doc_ids"]) for v in infl["scores"].values())
    assert np.mean(infl["scores"]["original"]) == pytest.approx(m["original.influence_mean"])
    assert infl["scores"]["unlearned"] != infl["scores"]["original"]

    # a hand-run `dvc status` of the LM stages has nothing to do
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "runs/text/req-lm-test-0001/dvc.yaml"],
        cwd=lm_project,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr

    # second run, other method: the trained LMs come from the cache
    state2 = lm_unlearning_pipeline(
        params_path=params_path,
        overrides={"unlearn.method": "neggrad_plus"},
        return_state=True,
    )
    assert state2.is_completed()
    from tests.test_flow import _task_states

    states = _task_states(state2.state_details.flow_run_id)
    assert states["train-model"] == ["Cached", "Cached"], states
    assert states["unlearn"] == ["Completed"], states


def test_lm_bad_request_fails_before_training(prefect_api, lm_project: Path):
    from flows.pipeline import unlearning_pipeline as lm_unlearning_pipeline

    bad = dict(REQUEST, request_id="req-lm-bad", forget={"sample_ids": ["macbeth/9.9"]})
    (lm_project / "requests" / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="unknown document id"):
        lm_unlearning_pipeline(
            params_path=str(lm_project / "params-lm.yaml"),
            overrides={"request.file": "requests/bad.yaml"},
        )
    assert not (lm_project / "artifacts").exists()


def test_cli_dispatches_lm_params(capsys):
    from flows.cli import main

    params = str(REPO / "params-lm.yaml")
    # `pipeline: lm` selects the LM parser and registry: its own method names in the error
    assert main(["run", "--params", params, "--method", "fisher_diagonal"]) == 2
    err = capsys.readouterr().err
    assert "unknown name 'fisher_diagonal'" in err and "gradient_ascent" in err
    assert main(["run", "--params", params, "--set", "lm.n_head=3"]) == 2
    assert "lm.n_embd: must be a multiple of lm.n_head" in capsys.readouterr().err
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "gradient_ascent" in out and "fisher_diagonal" in out
