"""Class requests end to end, and `unlearn stats fisher` on the same project: real DVC stages,
a real temporary Prefect API, SQLite MLflow, Parquet shards on a real local Ray.

A class request (two classes) runs through the same pipeline as random forgetting with the
gradient-free svd_projection method; then the sharded Fisher statistics of its forget split
are computed from the CLI, reusing the pipeline's cached original model, and equal the
in-process Fisher diagonal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main
from tests.conftest import make_dvc_project
from tests.test_flow import _task_states, tiny_params

FORGET = [3, 5]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    params = tiny_params(tmp_path / "proj")
    params["data"].update(max_train=400, max_test=150)
    params["train"].update(epochs=8)
    params["fisher"].update(kind="true_sampled", seed=4)
    params["unlearn"].update(method="svd_projection")
    params["unlearn"]["svd_projection"].update(retain_per_class=20, forget_per_class=20)
    params["ray"].update(num_cpus=2)
    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(params))
    request = {"request_id": "req-classes", "reason": "t", "forget": {"classes": FORGET}}
    (root / "requests" / "req.yaml").write_text(yaml.safe_dump(request))
    return root


def test_class_request_pipeline_then_sharded_stats(prefect_api, project, capsys):
    import ray
    from mlflow import MlflowClient

    from flows.pipeline import unlearning_pipeline
    from pipeline_lib.config import load_params
    from pipeline_lib.data.images import load_prepared
    from pipeline_lib.data.requests import load_manifests
    from pipeline_lib.modalities.image import fisher_split_ids, load_model
    from pipeline_lib.stats.activations import activation_grams, decompose_gram
    from pipeline_lib.stats.fisher import fisher_diagonal
    from pipeline_lib.stats.store import load_stats

    params_path = str(project / "params.yaml")
    # --- the class request through the pipeline (DVC extraction, MLflow tracking)
    state = unlearning_pipeline(params_path=params_path, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    data = load_prepared(project / "data" / "prepared")
    man = load_manifests(project / "runs" / "image" / "req-classes" / "manifests")
    labels = dict(zip(data.ids, data.y, strict=True))
    assert {int(labels[s]) for s in man.forget_ids} == set(FORGET)
    assert not {int(labels[s]) for s in man.retain_ids} & set(FORGET)
    lock = yaml.safe_load((project / "runs" / "image" / "req-classes" / "dvc.lock").read_text())
    run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["request_id"] == "req-classes"
    assert run.data.tags["dvc.manifests_md5"] == lock["stages"]["extract"]["outs"][0]["md5"]
    m = run.data.metrics
    assert m["original.forget_acc"] > 80 and m["unlearned.forget_acc"] < 20, m
    assert m["method.n_layers"] == 3 and "time.fisher_seconds" not in m  # gradient-free
    states = _task_states(state.state_details.flow_run_id)
    assert "fisher-statistics" not in states
    report = json.loads((Path(result["report_dir"]) / "report.json").read_text())
    assert report["method"] == "svd_projection"

    # --- sharded Fisher statistics of the forget split from the CLI
    try:
        argv = ["stats", "fisher", "--split", "forget", "--params", params_path, "--shards", "3"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        argv = ["stats", "activations", "--split", "retain", "--params", params_path]
        assert main(argv + ["--shards", "2", "--workers", "2"]) == 0
        out_act = capsys.readouterr().out
    finally:
        ray.shutdown()
    path = Path(out.strip().splitlines()[-1].split(" (content hash")[0])
    assert path.is_file() and path.parent == project / "artifacts" / "stats"
    # the forget split's shards were temporary: no Parquet copy of forgotten rows remains
    assert not list((project / "artifacts" / "stats").rglob("*.parquet"))
    tensors, meta = load_stats(path)
    cfg = meta["config"]
    assert cfg["split"] == "forget" and cfg["n_shards"] == 3 and cfg["kind"] == "true_sampled"
    from pipeline_lib.stats.store import stats_path

    assert path == stats_path(path.parent, cfg["identity"])  # named by identity, not content
    assert load_stats(path, verify=True)[1]["digest"] == meta["digest"]
    # the pipeline's original model was reused (cached task), not retrained
    weights = sorted((project / "artifacts" / "models").glob("original-*.safetensors"))
    assert len(weights) == 1 and cfg["weights_digest"][:16] in weights[0].name

    params = load_params(params_path)
    ids = fisher_split_ids(man, "forget", params.fisher)
    assert cfg["n"] == len(ids) > 0
    model = load_model(weights[0], params.model, data)
    X, y = data.subset(ids)
    want = fisher_diagonal(
        model, torch.from_numpy(X), torch.from_numpy(y), "true_sampled", 256, 4, list(ids)
    )
    for k in want:
        torch.testing.assert_close(tensors[k], want[k], rtol=1e-4, atol=1e-9)

    # --- activation statistics of the retain split: U and S of every layer's inputs
    act_path = Path(out_act.strip().splitlines()[-1].split(" (content hash")[0])
    act, act_meta = load_stats(act_path)
    assert act_meta["config"]["statistic"] == "activations" and act_meta["config"]["n_shards"] == 2
    Xr, _ = data.subset(man.retain_ids)
    grams, n = activation_grams(model, torch.from_numpy(Xr))
    assert act_meta["config"]["n"] == n == len(man.retain_ids)
    for name, g in grams.items():
        u, s = decompose_gram(g)
        torch.testing.assert_close(act[f"{name}.S"], s, rtol=1e-3, atol=1e-3 * float(s[0]))
        assert act[f"{name}.U"].shape == u.shape


def test_cli_stats_rejects_bad_split(capsys):
    with pytest.raises(SystemExit):
        main(["stats", "fisher", "--split", "test"])
    assert "invalid choice: 'test'" in capsys.readouterr().err


def test_pipeline_reuses_the_stats_files(prefect_api, tmp_path: Path, capsys):
    """`unlearn stats fisher` for both splits, then the pipeline finds those files instead of
    recomputing (fisher_diagonal, then ssd on the same request); a second request with splits
    of the same size gets its own files; every `unlearn stats` call is an MLflow run."""
    from mlflow import MlflowClient

    from flows.pipeline import unlearning_pipeline
    from pipeline_lib.config import load_params
    from pipeline_lib.data.images import load_prepared
    from pipeline_lib.data.requests import load_manifests
    from pipeline_lib.modalities.image import fisher_split_ids, load_model
    from pipeline_lib.stats.fisher import fisher_diagonal
    from pipeline_lib.stats.store import load_stats

    params = tiny_params(tmp_path / "proj")
    params["data"].update(max_train=300, max_test=100)
    params["train"].update(epochs=3)
    params["fisher"].update(kind="true_sampled", seed=5, max_retain=120)
    params["stats"].update(n_shards=3, fisher_backend="ray")  # req-b: the pipeline on Ray
    params["ray"].update(num_cpus=2)
    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(params))
    for rid, seed in (("req-a", 3), ("req-b", 4)):
        request = {"request_id": rid, "reason": "t", "forget": {"fraction": 0.1, "seed": seed}}
        (root / "requests" / f"{rid}.yaml").write_text(yaml.safe_dump(request))
    pp = str(root / "params.yaml")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)

    def stats_cli(split: str, request: str) -> tuple[Path, str]:
        argv = ["stats", "fisher", "--split", split, "--params", pp]
        assert main(argv + ["--set", f"request.file=requests/{request}.yaml"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        return Path(out[-1].split(" (content hash")[0]), "\n".join(out)

    cli = {split: stats_cli(split, "req-a")[0] for split in ("forget", "retain")}
    assert all(p.is_file() for p in cli.values())
    _, again = stats_cli("forget", "req-a")
    assert "already stored" in again

    # every `unlearn stats` call is a finished MLflow run that points at the file
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'statistics'")
    assert len(runs) == 3
    assert {r.info.run_name for r in runs} == {
        "stats-fisher-forget-req-a",
        "stats-fisher-retain-req-a",
    }
    assert sorted(r.data.tags["stats.reused"] for r in runs) == ["false", "false", "true"]
    for r in runs:
        _, meta = load_stats(r.data.tags["stats.path"])
        assert r.info.status == "FINISHED"
        assert r.data.tags["stats.content_hash"] == meta["digest"]
        assert r.data.metrics["n"] == meta["config"]["n"] > 0

    # the pipeline finds the CLI's files, for fisher_diagonal and then ssd
    over = {"request.file": "requests/req-a.yaml"}
    res = unlearning_pipeline(params_path=pp, overrides=over)
    res_ssd = unlearning_pipeline(params_path=pp, overrides={**over, "unlearn.method": "ssd"})
    for r in (res, res_ssd):
        run = client.get_run(r["run_id"])
        assert run.data.metrics["stats.fisher_forget_reused"] == 1
        assert run.data.metrics["stats.fisher_retain_reused"] == 1
        assert run.data.tags["stats.fisher_forget.path"] == str(cli["forget"])
        assert run.data.tags["stats.fisher_retain.path"] == str(cli["retain"])

    # ... and the stored values are what an in-process recompute gives (ids as keys)
    p = load_params(pp, over)
    data = load_prepared(root / "data" / "prepared")
    man = load_manifests(root / "runs" / "image" / "req-a" / "manifests")
    model = load_model(next((root / "artifacts" / "models").glob("original-*")), p.model, data)
    for split in ("forget", "retain"):
        ids = fisher_split_ids(man, split, p.fisher)
        X, y = data.subset(ids)
        want = fisher_diagonal(
            model, torch.from_numpy(X), torch.from_numpy(y), "true_sampled", 64, 5, list(ids)
        )
        got, _ = load_stats(cli[split], verify=True)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-9)

    # another request with splits of the same size does not pick up req-a's files
    res_b = unlearning_pipeline(params_path=pp, overrides={"request.file": "requests/req-b.yaml"})
    run_b = client.get_run(res_b["run_id"])
    assert run_b.data.metrics["stats.fisher_forget_reused"] == 0
    assert run_b.data.metrics["stats.fisher_retain_reused"] == 0
    assert run_b.data.tags["stats.fisher_forget.path"] != str(cli["forget"])
    _, meta_b = load_stats(run_b.data.tags["stats.fisher_forget.path"])
    assert meta_b["config"]["backend"] == "ray" and meta_b["config"]["n_shards"] == 3
    assert not list((root / "artifacts" / "stats").rglob("*.parquet"))  # shards: temporary
    assert len(list((root / "artifacts" / "stats").glob("fisher-*.safetensors"))) == 4
