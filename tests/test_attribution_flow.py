"""The attribution flow on a real local Ray and, marked ``cluster``, on a real two-node Ray
cluster on 127.0.0.1 (infra/local-cluster.sh): chunks, resume, LDS, MLflow record."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, make_dvc_project


def small_params(root: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_train=200, max_test=60)
    params["model"].update(hidden=[32])
    params["train"].update(epochs=2)
    params["attribution"].update(n_models=24, chunk_size=6, lds_heldout=6, epochs=2)
    params["ray"].update(num_cpus=2)
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="attr-test", dvc_root=str(root)
    )
    return params


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_dvc_project(tmp_path / "proj", yaml.safe_dump(small_params(tmp_path / "proj")))


@pytest.fixture
def local_ray():
    import ray

    yield
    ray.shutdown()


def test_attribution_flow_local_ray_resumes_and_records(prefect_api, project: Path, local_ray):
    from mlflow import MlflowClient

    from flows.attribution import attribution_flow
    from pipeline_lib.attribution.store import AttributionStore

    params_path = str(project / "params.yaml")
    result = attribution_flow(params_path=params_path)
    stats = result["stats"]
    assert stats["models_trained"] == 24 and len(stats["chunks"]) == 4
    store = AttributionStore.open(result["store"])
    store.check()
    masks, seeds, outputs = store.load()
    assert masks.shape == (24, 200) and (masks.sum(1) == 100).all()
    assert outputs.shape == (24, 260, 10) and np.isfinite(outputs).all()
    assert len(set(seeds.tolist())) == 24
    assert -1.0 <= result["lds"]["lds_test"] <= 1.0

    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(result["run_id"])
    assert run.data.tags["masks_digest"] == store.masks_digest()
    assert run.data.metrics["models_trained"] == 24
    assert "lds_test" in run.data.metrics and run.data.params["store.alpha"] == "0.5"

    # a re-run trains nothing; a corrupted chunk is detected and only it is retrained
    again = attribution_flow(params_path=params_path)
    assert again["stats"]["models_trained"] == 0
    npy = store.chunk_dir(6) / "outputs.npy"
    npy.write_bytes(npy.read_bytes()[:-8] + b"\0" * 8)
    third = attribution_flow(params_path=params_path)
    assert third["stats"]["models_trained"] == 6
    assert [c["start"] for c in third["stats"]["chunks"]] == [6]
    assert np.array_equal(AttributionStore.open(result["store"]).load()[2], outputs)  # same models


def test_oracles_train_on_the_retain_set(prefect_api, project: Path, local_ray):
    from flows.attribution import attribution_flow
    from pipeline_lib.attribution.store import AttributionStore
    from pipeline_lib.data.requests import load_manifests

    (project / "requests" / "r.yaml").write_text(
        yaml.safe_dump(
            {"request_id": "req-orc", "reason": "t", "forget": {"fraction": 0.2, "seed": 1}}
        )
    )
    result = attribution_flow(
        params_path=str(project / "params.yaml"),
        overrides={"request.file": "requests/r.yaml", "attribution.oracles": 4},
        kind="oracles",
    )
    masks, seeds, _ = AttributionStore.open(result["store"]).load()
    man = load_manifests(project / "runs" / "image" / "req-orc" / "manifests")
    targets = AttributionStore.open(result["store"]).targets().column("sample_id").to_pylist()
    retain = np.isin(np.array(targets[:200]), man.retain_ids)
    assert masks.shape == (4, 200) and (masks == retain).all()
    assert len(set(seeds.tolist())) == 4


@pytest.fixture
def ray_cluster():
    """A real Ray cluster on 127.0.0.1: head node + one worker node, one CPU each."""
    import ray

    state = tempfile.mkdtemp(prefix="ulf-", dir="/tmp")  # short: Ray's socket paths live here
    env = dict(os.environ, UNLEARNFLOW_RAY_DIR=state)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    script = str(REPO / "infra" / "local-cluster.sh")
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True, timeout=180)
    try:
        out = subprocess.run(
            ["bash", script, "env"], env=env, check=True, capture_output=True, text=True
        )
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in out.stdout.splitlines()
            if line.startswith("export ")
        )
        yield exports
    finally:
        ray.shutdown()
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.cluster
def test_attribution_runs_on_both_nodes_of_a_real_cluster(project: Path, ray_cluster):
    """`unlearn attribute` in a fresh process (Ray keeps one auth token per process), joined to
    the cluster through RAY_ADDRESS only: no code or parameter names the cluster."""
    import json

    env = dict(os.environ, **{k: v.strip("'\"") for k, v in ray_cluster.items()})
    env.pop("PREFECT_API_URL", None)
    exe = Path(sys.executable).parent / "unlearn"
    proc = subprocess.run(
        [
            str(exe),
            "attribute",
            "--models",
            "8",
            "--params",
            str(project / "params.yaml"),
            "--set",
            "attribution.chunk_size=2",
            "--set",
            "attribution.lds_heldout=0",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trained 8 models" in proc.stdout and "on 2 node(s)" in proc.stdout, proc.stdout
    store = next((project / "artifacts" / "attribution").glob("subsets-*"))
    chunks = json.loads((store / "manifest.json").read_text())["chunks"]
    assert len(chunks) == 4
    assert len({c["node_id"] for c in chunks.values()}) == 2, chunks
