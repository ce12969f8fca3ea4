"""`unlearn tune`: search spaces declared beside the methods, their Ray Tune conversion, named
presets (written atomically, selected by unlearn.preset / --preset), and one real Ray Tune
search on digits (local Ray, SQLite MLflow, a real DVC project in tmp)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline_lib.config import ConfigError, build_params, load_params
from pipeline_lib.config.presets import (
    preset_overrides,
    preset_store_mismatch,
    read_preset,
    write_preset,
)
from pipeline_lib.methods import METHODS
from pipeline_lib.methods.space import Choice, IntRange, LogUniform, Uniform, check_space
from tests.conftest import REPO, make_dvc_project

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_tunable_method_declares_a_space_of_its_own_fields() -> None:
    for name, m in METHODS.items():
        fields = {f.name for f in dataclasses.fields(m.params_type)}
        assert set(m.search_space) <= fields, name
        if name != "retrain":  # exact: nothing to tune
            assert m.search_space, name
    assert METHODS["retrain"].search_space == {}
    # matching methods never search what their precomputed targets depend on
    assert "retain_multiple" not in METHODS["dmm"].search_space
    with pytest.raises(ValueError, match="nope is not a field of unlearn.dmm"):
        check_space("dmm", METHODS["dmm"].params_type, {"nope": Uniform(0, 1)})
    with pytest.raises(ValueError, match="low < high"):
        check_space("dmm", METHODS["dmm"].params_type, {"lr": LogUniform(1e-2, 1e-3)})


def test_spaces_convert_to_ray_tune_distributions_within_bounds() -> None:
    from tasks.tune import to_tune_space

    space = {
        "a": LogUniform(1e-4, 1e-2),
        "b": Uniform(0.5, 0.9),
        "c": IntRange(3, 4),
        "d": Choice((64, 512)),
    }
    tune_space = to_tune_space(space)
    rng = np.random.default_rng(0)
    draws = {k: [d.sample(random_state=rng) for _ in range(200)] for k, d in tune_space.items()}
    assert 1e-4 <= min(draws["a"]) and max(draws["a"]) <= 1e-2
    # log-uniform: about half the draws below the geometric mean 1e-3
    assert 0.35 < np.mean(np.asarray(draws["a"]) < 1e-3) < 0.65
    assert 0.5 <= min(draws["b"]) and max(draws["b"]) <= 0.9
    assert set(draws["c"]) == {3, 4}  # IntRange's high is included
    assert set(draws["d"]) == {64, 512}


def _raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _preset(root: Path, name: str, method: str, params: dict, **kw) -> Path:
    content = {
        "preset": name,
        "method": method,
        "dataset": kw.get("dataset", "digits"),
        "model": kw.get("model", "mlp"),
        "params": params,
    }
    return write_preset(root / "presets" / name / f"{method}.yaml", content, overwrite=False)


def test_preset_sets_its_methods_and_explicit_overrides_win(tmp_path: Path) -> None:
    raw = _raw()
    raw["tracking"]["dvc_root"] = str(tmp_path)
    path = _preset(tmp_path, "digits-mlp", "dmm", {"epochs": 40, "lr": 0.004})
    _preset(tmp_path, "digits-mlp", "ssd", {"alpha": 3.5})
    assert read_preset(path)["params"] == {"epochs": 40, "lr": 0.004}
    assert path.read_text().startswith("# Preset digits-mlp")
    plain = build_params(raw)
    p = build_params(raw, {"unlearn.preset": "digits-mlp"})
    assert (p.unlearn.dmm.epochs, p.unlearn.dmm.lr, p.unlearn.ssd.alpha) == (40, 0.004, 3.5)
    assert p.unlearn.dmm.batch_size == plain.unlearn.dmm.batch_size  # untouched keys stay
    assert p.unlearn.finetune == plain.unlearn.finetune  # methods without a file stay
    p = build_params(raw, {"unlearn.preset": "digits-mlp", "unlearn.dmm.lr": 0.01})
    assert (p.unlearn.dmm.epochs, p.unlearn.dmm.lr) == (40, 0.01)
    # never replaced silently
    with pytest.raises(ConfigError, match="exists: pass --overwrite"):
        _preset(tmp_path, "digits-mlp", "dmm", {"epochs": 1})
    assert read_preset(path)["params"]["epochs"] == 40
    write_preset(path, {**read_preset(path), "params": {"epochs": 7}}, overwrite=True)
    assert build_params(raw, {"unlearn.preset": "digits-mlp"}).unlearn.dmm.epochs == 7
    assert not [f for f in path.parent.iterdir() if f.name.startswith(".")]  # no temp left


def test_bad_presets_are_refused_naming_the_key_or_file(tmp_path: Path) -> None:
    raw = _raw()
    raw["tracking"]["dvc_root"] = str(tmp_path)
    with pytest.raises(ConfigError, match="unlearn.preset: no preset 'missing'"):
        build_params(raw, {"unlearn.preset": "missing"})
    with pytest.raises(ConfigError, match="not a preset name"):
        build_params(raw, {"unlearn.preset": "../etc"})
    path = _preset(tmp_path, "other", "dmm", {"epochs": 3}, dataset="fashion-mnist", model="cnn")
    with pytest.raises(ConfigError, match=f"{path} was tuned on fashion-mnist/cnn"):
        build_params(raw, {"unlearn.preset": "other"})
    bad = _preset(tmp_path, "typo", "dmm", {"epochz": 3})
    with pytest.raises(ConfigError, match="epochz"):
        build_params(raw, {"unlearn.preset": "typo"})
    bad.write_text("method: ssd\ndataset: digits\nmodel: mlp\nparams: {}\n")
    with pytest.raises(ConfigError, match="differs from the file name"):
        preset_overrides({"unlearn": {"preset": "typo"}, "tracking": {"dvc_root": str(tmp_path)}})


def _params(root: Path) -> dict:
    params = _raw()
    params["data"].update(max_train=240, max_test=80)
    params["model"].update(hidden=[32])
    params["train"].update(epochs=15)
    params["request"].update(file="requests/val.yaml")
    params["attribution"].update(n_models=48, chunk_size=12, lds_heldout=0)
    params["evaluate"].update(n_models=4)
    params["tune"].update(trials=3, models=2, seed=1)
    params["ray"].update(num_cpus=2)
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="tune-test", dvc_root=str(root)
    )
    return params


def test_cli_refuses_before_any_work(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(_params(tmp_path / "proj")))
    (root / "requests" / "val.yaml").write_text(
        "request_id: val-1\nreason: test\nforget:\n  fraction: 0.05\n  seed: 3\n"
    )
    params = str(root / "params.yaml")
    assert main(["tune", "--method", "dmm", "--request", "nope.yaml", "--params", params]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["tune", "--method", "retrain", "--params", params]) == 2
    assert "declares no search space" in capsys.readouterr().err
    assert main(["tune", "--method", "dmm", "--models", "9", "--params", params]) == 2
    assert "tune.models: 9 exceeds evaluate.n_models" in capsys.readouterr().err
    _preset(root, "digits-mlp", "dmm", {"epochs": 3})
    assert main(["tune", "--method", "dmm", "--params", params]) == 2
    assert "dmm.yaml exists: pass --overwrite" in capsys.readouterr().err
    assert main(["run", "--preset", "digits-mlp", "--method", "ssd", "--params", params]) == 2
    assert "has no ssd.yaml (tuned there: dmm)" in capsys.readouterr().err
    # nothing was prepared, trained or tracked
    assert not (root / "data").exists() and not (root / "artifacts").exists()
    assert not (root / "mlflow.db").exists()


def test_run_search_with_ray_tune_scores_the_start_and_samples(tmp_path: Path) -> None:
    """Ray Tune for real, without the flow's DVC, Prefect and stores: 2 finetune trials on a
    small digits problem (2 originals against 4 oracles trained here)."""
    import ray
    import torch
    from sklearn.datasets import load_digits

    from pipeline_lib.attribution.datamodels import margins as margins_of
    from pipeline_lib.comparison import Problem, metrics_of_logits
    from pipeline_lib.models.image import build_model
    from pipeline_lib.training.fit import FitSettings, fit, predict_logits
    from tasks.attribution import connect
    from tasks.evaluation import config_payload
    from tasks.tune import best_trial, run_search, score_setting

    d = load_digits()
    X = torch.from_numpy((d.data[:300] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    y = torch.from_numpy(d.target[:300].astype(np.int64))
    problem = Problem(X, y, np.arange(0, 12), np.arange(12, 240), np.arange(240, 300), 10)
    params = build_params(_raw(), {"model.hidden": [32], "evaluate.mia_folds": 2})
    r = torch.from_numpy(problem.retain)

    def trained(seed: int, rows: torch.Tensor) -> torch.nn.Module:
        m = build_model(params.model, (1, 8, 8), 10, seed)
        fit(m, X[rows], y[rows], FitSettings(8, 64, 3e-3), seed)
        return m

    originals = [trained(s, torch.arange(240)).state_dict() for s in (10, 11)]
    oracle_logits = [predict_logits(trained(s, r), X) for s in (20, 21, 22, 23)]
    cfg = config_payload(params)  # what the flow hands the trials
    data = dict(
        problem=problem,
        states=originals,
        matches=None,
        cfg=cfg,
        oracle_margins=np.stack([margins_of(z.numpy(), y.numpy()) for z in oracle_logits]),
        oracle_metrics=[metrics_of_logits(z, problem, *cfg["mia"]) for z in oracle_logits],
    )
    connect(build_params(_raw(), {"ray.num_cpus": 2}).ray)  # the flows' local Ray
    try:
        trials = run_search(
            "finetune",
            {"epochs": IntRange(1, 3), "lr": LogUniform(1e-4, 1e-2)},
            {"epochs": 2, "lr": 1e-3, "batch_size": 64},
            objective="avg_gap",
            trials=2,
            seed=0,
            storage=tmp_path / "tune",
            cpus_per_trial=1,
            max_concurrent=None,
            unlearn_seed=0,
            **data,
        )
    finally:
        ray.shutdown()
    assert [t["error"] for t in trials] == [None, None]
    assert trials[0]["config"] == {"epochs": 2, "lr": 1e-3}  # the start setting first
    assert trials[1]["config"] != trials[0]["config"]
    assert 1 <= trials[1]["config"]["epochs"] <= 3 and 1e-4 <= trials[1]["config"]["lr"] <= 1e-2
    # each trial's report is the comparison's summary of that setting, reproducible here
    again = score_setting("finetune", trials[1]["config"], seed=0, **data)
    assert again["avg_gap"] == pytest.approx(trials[1]["metrics"]["avg_gap"])
    assert again["klom_forget_mean"] == pytest.approx(trials[1]["metrics"]["klom_forget_mean"])
    best = best_trial(trials, "avg_gap")
    assert best["metrics"]["avg_gap"] == min(t["metrics"]["avg_gap"] for t in trials)


@pytest.mark.slow
def test_tune_flow_searches_logs_trials_and_writes_a_preset(prefect_api, tmp_path: Path) -> None:
    """The whole flow: 3 Ray Tune trials of DMM on digits (2 originals each against 4
    oracles), DVC stages, stores, MLflow runs, the preset. 200-400 s on the shared 2 cores
    (load 12-20), so slow; the Ray Tune search itself is covered by the test above."""
    import ray
    from mlflow import MlflowClient

    from flows.tune import tune_flow

    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(_params(tmp_path / "proj")))
    (root / "requests" / "val.yaml").write_text(
        "request_id: val-1\nreason: test\nforget:\n  fraction: 0.05\n  seed: 3\n"
    )
    params = str(root / "params.yaml")
    try:
        result = tune_flow(params_path=params, method="dmm")
    finally:
        ray.shutdown()
    trials = result["trials"]
    assert len(trials) == 3 and all(t["error"] is None for t in trials)
    start = load_params(params).unlearn.dmm
    space = METHODS["dmm"].search_space
    # the first trial scores the params' own setting, the others sample the declared space
    assert trials[0]["config"] == {k: getattr(start, k) for k in space}
    for t in trials[1:]:
        assert set(t["config"]) == set(space)
        assert all(space[k].contains(v) for k, v in t["config"].items())
    assert trials[1]["config"] != trials[0]["config"]
    scores = [t["metrics"]["klom_forget_mean"] for t in trials]
    assert all(np.isfinite(scores)) and min(scores) >= 0
    best = result["best"]
    assert best["metrics"]["klom_forget_mean"] == min(scores)

    # the preset: the best trial's setting over the rest of the section, with its provenance
    path = root / "presets" / "digits-mlp" / "dmm.yaml"
    assert result["preset_file"] == str(path)
    preset = read_preset(path)
    assert preset["params"] == {**dataclasses.asdict(start), **best["config"]}
    assert preset["tuning"]["score"] == min(scores)
    assert preset["tuning"]["request_id"] == "val-1"
    # the subset store the datamodel targets came from, and a run with another size is warned
    n_sub = load_params(params).attribution.n_models
    assert preset["tuning"]["subset_models"] == n_sub
    assert preset["tuning"]["subset_alpha"] == load_params(params).attribution.alpha
    tree = yaml.safe_load(Path(params).read_text())
    tree["unlearn"]["preset"] = "digits-mlp"
    assert preset_store_mismatch(tree, "dmm", n_sub) is None
    assert f"tuned with {n_sub} subset models" in preset_store_mismatch(tree, "dmm", n_sub + 1)
    tuned = load_params(params, {"unlearn.preset": "digits-mlp"}).unlearn.dmm
    assert {k: getattr(tuned, k) for k in space} == best["config"]

    # MLflow: one parent run with the preset as artifact, one child run per trial
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "tuning"
    assert parent.data.metrics["best.klom_forget_mean"] == pytest.approx(min(scores))
    assert {a.path for a in client.list_artifacts(result["run_id"], "preset")} == {
        "preset/dmm.yaml"
    }
    assert len(result["children"]) == 3
    for t, child_id in zip(trials, result["children"], strict=True):
        child = client.get_run(child_id)
        assert child.data.tags["mlflow.parentRunId"] == result["run_id"]
        assert child.data.metrics["klom_forget_mean"] == pytest.approx(
            t["metrics"]["klom_forget_mean"]
        )
        assert child.data.params["unlearn.dmm.lr"] == str(t["config"]["lr"])


def test_p95_objective_is_accepted_and_ranks_trials_by_the_tail() -> None:
    from tasks.tune import OBJECTIVES, best_trial

    params = build_params({"tune": {"objective": "klom_forget_p95"}})
    assert params.tune.objective == "klom_forget_p95" and "klom_forget_p95" in OBJECTIVES
    trials = [
        {"error": None, "metrics": {"klom_forget_mean": 1.0, "klom_forget_p95": 3.0}},
        {"error": None, "metrics": {"klom_forget_mean": 1.2, "klom_forget_p95": 2.0}},
        {"error": "boom", "metrics": {}},
    ]
    # the mean and the tail disagree: each objective picks its own trial
    assert best_trial(trials, "klom_forget_mean")["metrics"]["klom_forget_mean"] == 1.0
    assert best_trial(trials, "klom_forget_p95")["metrics"]["klom_forget_p95"] == 2.0
    with pytest.raises(ConfigError, match="tune.objective"):
        build_params({"tune": {"objective": "klom_forget_max"}})


def test_a_datamodel_preset_warns_when_the_subset_store_differs(tmp_path: Path) -> None:
    raw = _raw()
    raw["tracking"]["dvc_root"] = str(tmp_path)
    path = _preset(tmp_path, "digits-mlp", "dmm", {"epochs": 40})
    assert preset_store_mismatch({**raw, "unlearn": {"preset": "digits-mlp"}}, "dmm", 256) is None
    write_preset(path, {**read_preset(path), "tuning": {"subset_models": 2000}}, overwrite=True)
    tree = {**raw, "unlearn": {**raw["unlearn"], "preset": "digits-mlp"}}
    msg = preset_store_mismatch(tree, "dmm", 256)
    assert msg and "2000 subset models" in msg and "has 256" in msg and "digits-mlp" in msg
    assert preset_store_mismatch(tree, "dmm", 2000) is None
    # the subset fraction is checked when the preset records it and the caller passes it
    write_preset(
        path,
        {**read_preset(path), "tuning": {"subset_models": 2000, "subset_alpha": 0.7}},
        overwrite=True,
    )
    assert preset_store_mismatch(tree, "dmm", 2000, 0.7) is None
    assert preset_store_mismatch(tree, "dmm", 2000) is None
    msg = preset_store_mismatch(tree, "dmm", 2000, 0.5)
    assert msg and "alpha 0.7 (attribution.alpha); this run has 0.5" in msg
    assert "subset models" not in msg
    both = preset_store_mismatch(tree, "dmm", 256, 0.5)
    assert both and "2000 subset models" in both and "alpha 0.7" in both
    assert preset_store_mismatch(tree, "oracle_matching", 256) is None  # no file for it
    assert preset_store_mismatch(raw, "dmm", 256) is None  # no preset selected


def test_every_committed_preset_loads_on_its_own_dataset_and_model() -> None:
    """presets/<name>/<method>.yaml in the repository: each parses, names its folder and
    method, and selecting it on a params tree of its dataset and model sets the method's
    section to the preset's values (the section's validation included)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    folders = sorted(p for p in (REPO / "presets").iterdir() if p.is_dir())
    assert folders, "no committed presets"
    for folder in folders:
        for file in sorted(folder.glob("*.yaml")):
            p = read_preset(file)
            assert p["preset"] == folder.name, file
            overrides = {
                "data.name": p["dataset"],
                "model.name": p["model"],
                "unlearn.preset": folder.name,
                "tracking.dvc_root": str(REPO),
            }
            section = getattr(build_params(raw, overrides).unlearn, p["method"])
            assert {k: getattr(section, k) for k in p["params"]} == p["params"], file
            if METHODS[p["method"]].needs_targets == "datamodels":
                assert p["tuning"]["subset_models"] > 0, file  # the store it was tuned with
