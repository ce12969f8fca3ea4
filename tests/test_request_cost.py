"""Per-request cost in the deletion service (issue 15) on real components: a temporary Prefect
API, MLflow on SQLite with its Model Registry and the ledger, a real DVC repo.

Each registered version gets its full-data Fisher sums (task ``full-data-statistics``: the
exact first version at bootstrap, each approximate version right after it is registered);
each request then computes only its forget set and derives I_R = (Σ_D − Σ_F)/(N − |F|),
which equals I_R computed over the retain set directly. The activation statistics of the
retain set come from the version's full-data Gram sums the same way: G_R = G_D − G_F.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import make_dvc_project
from tests.test_flow import _task_states, tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "unlearnflow-cost-test"


def _cli(*argv: str) -> tuple[int, str]:
    from flows.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def test_service_amortises_full_data_statistics(prefect_api, tmp_path: Path):
    from mlflow import MlflowClient

    from flows.service import sweep_flow
    from pipeline_lib.config import load_params
    from pipeline_lib.data.images import load_prepared
    from pipeline_lib.data.requests import load_manifests
    from pipeline_lib.modalities.image import load_model
    from pipeline_lib.stats.fisher import fisher_diagonal
    from pipeline_lib.stats.store import load_stats
    from tasks.registry import download_version_weights

    root = tmp_path / "proj"
    params = tiny_params(root)
    params["data"].update(max_train=240, max_test=80)
    params["train"].update(epochs=2)
    params["fisher"].update(kind="true_sampled", seed=2)
    params["tracking"]["experiment"] = "cost-test"
    params["service"].update(
        model_name=MODEL,
        ledger_url=None,
        oracle="never",
        gates={
            "max_forget_accuracy": None,
            "max_test_accuracy_drop": None,
            "mia_auc_band": None,
            "fallback": "keep-parent",
        },
    )
    make_dvc_project(root, yaml.safe_dump(params))
    files = []
    for rid, seed in (("cost-a", 1),):
        doc = {"request_id": rid, "reason": "t", "forget": {"fraction": 0.05, "seed": seed}}
        path = root / "requests" / f"{rid}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    pp = str(root / "params.yaml")
    assert _cli("submit", "--params", pp, *files)[0] == 0
    state = sweep_flow(params_path=pp, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert [r["status"] for r in result["processed"]] == ["done"], result
    assert "full-data-statistics" in _task_states(state.state_details.flow_run_id)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {str(mv.version): mv for mv in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions) == ["1", "2"]
    stats_dir = root / "artifacts" / "stats"
    full = {}
    for f in stats_dir.glob("fisher-full-*.safetensors"):
        tensors, meta = load_stats(f, verify=True)
        full[meta["config"]["weights_digest"]] = (tensors, meta["config"])
    # one full-data file per version, each over the ids that version was trained on
    data = load_prepared(root / "data" / "prepared")
    train = set(data.split_ids("train").tolist())
    forget = {
        rid: set(load_manifests(root / "runs" / "image" / rid / "manifests").forget_ids.tolist())
        for rid in ("cost-a",)
    }
    trained_on = {
        "1": train,
        "2": train - forget["cost-a"],
    }
    for v, mv in versions.items():
        tensors, cfg = full[mv.tags["state_digest"]]
        assert cfg["n"] == len(trained_on[v]) and cfg["reduction"] == "sum", (v, cfg)
        assert all(t.dtype == torch.float64 for t in tensors.values())

    # each request derived I_R from its parent's sums, computing only its forget set ...
    p = load_params(pp)
    for rid, parent in (("cost-a", "1"),):
        (run,) = client.search_runs(
            [client.get_experiment_by_name("cost-test").experiment_id],
            filter_string=f"tags.request_id = '{rid}'",
        )
        m = run.data.metrics
        assert m["stats.retain_from_full"] == 1, m
        # the cost block: the request's own cost apart from the amortised statistics
        assert m["cost.amortised_stats_seconds"] > 0, m
        assert m["cost.request_seconds"] < m["cost.direct_request_seconds"], m
        assert 0 < m["cost.break_even_requests"] < float("inf"), m
        assert m["cost.unlearn_seconds"] == pytest.approx(m["cost.request_seconds"]), m
        retain_file = Path(run.data.tags["stats.fisher_retain.path"])
        got, meta = load_stats(retain_file, verify=True)
        assert meta["config"]["backend"] == "full_minus_forget"
        # ... and that I_R is the Fisher diagonal over the retain set itself
        man = load_manifests(root / "runs" / "image" / rid / "manifests")
        path, _ = download_version_weights(uri, MODEL, parent, tmp_path / f"v{parent}")
        model = load_model(path, p.model, data)
        X, y = data.subset(man.retain_ids)
        want = fisher_diagonal(
            model,
            torch.from_numpy(X),
            torch.from_numpy(y),
            "true_sampled",
            64,
            2,
            list(man.retain_ids),
        )
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-9)
        assert np.isin(man.retain_ids, list(trained_on[parent])).all()

        # the retain activations of the same request: G_R = G_D − G_F of the parent, stored
        # under the identity of the sharded statistic over R, equal to the direct Grams
        from pipeline_lib.config import replace
        from pipeline_lib.stats.activations import activation_grams
        from tasks.statistics import activations_from_full, full_activation_grams, identity_for

        man_dir = root / "runs" / "image" / rid / "manifests"
        pr = replace(p, request=replace(p.request, out_dir=str(man_dir)))
        weights = {"path": str(path), "digest": versions[parent].tags["state_digest"]}
        res = activations_from_full(pr, weights, data)
        assert res["retain_from"] == "full_minus_forget" and not res["full_reused"], res
        assert res["identity"] == identity_for(
            pr, "activations", "retain", weights["digest"], data.content_hash
        )
        assert full_activation_grams(pr, weights)["reused"], man_dir  # stored once per version
        basis, meta = load_stats(res["path"], verify=True)
        assert meta["config"]["backend"] == "full_minus_forget"
        direct, n_r = activation_grams(model, torch.from_numpy(X), dtype=torch.float64)
        assert n_r == res["n"] == len(man.retain_ids)
        for layer, g in direct.items():
            u, s_ = basis[f"{layer}.U"], basis[f"{layer}.S"]
            torch.testing.assert_close(
                (u * s_.square()) @ u.T, g, rtol=0, atol=1e-9 * float(g.abs().max())
            )


def test_request_cost_break_even():
    from pipeline_lib.evaluation.metrics import build_report, request_cost

    c = request_cost(0.5, 0.01, 1.0, 30.0, 10.0)
    assert c["request_seconds"] == pytest.approx(1.51)
    assert c["direct_request_seconds"] == pytest.approx(11.5)
    assert c["break_even_requests"] == pytest.approx(30.0 / (11.5 - 1.51))
    assert request_cost(0.5, 2.0, 1.0, 0.0, 2.0)["break_even_requests"] == 0.0  # direct
    assert request_cost(0.5, 3.0, 1.0, 5.0, 2.0)["break_even_requests"] == float("inf")
    report = build_report({"original": {"forget_acc": 1.0}}, 1.51, 10.0, {"cost": c, "x": 1})
    assert report["cost"]["unlearn_over_retrain"] == pytest.approx(0.151)
    assert report["cost"]["break_even_requests"] == c["break_even_requests"] and report["x"] == 1


@pytest.mark.parametrize("arch", ["mlp", "cnn", "vit"])
def test_retain_grams_from_full_equal_direct_float64(arch):
    """G_R = G_D − G_F equals the Gram sums computed over R itself in float64 (whatever rows
    F takes and in whatever order R comes), and so does its basis; refusals name the fault."""
    from pipeline_lib.config import ModelConfig
    from pipeline_lib.models.image import build_model
    from pipeline_lib.stats.activations import (
        activation_grams,
        decompose_gram,
        retain_grams_from_full,
    )

    cfgs = {
        "mlp": ModelConfig(name="mlp", hidden=(16, 12)),
        "cnn": ModelConfig(name="cnn", channels=(3, 5)),
        "vit": ModelConfig(
            name="vit", vit_patch=4, vit_dim=16, vit_depth=1, vit_heads=2, vit_mlp=24
        ),
    }
    model = build_model(cfgs[arch], (1, 8, 8), 10, seed=0).double()
    X = torch.rand((40, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    forget = np.array([1, 4, 9, 30, 31, 38])
    retain = np.setdiff1d(np.arange(len(X)), forget)[::-1].copy()
    g_d, n = activation_grams(model, X, batch_size=7)
    g_f, n_f = activation_grams(model, X[forget], batch_size=4)
    got, n_r = retain_grams_from_full(g_d, n, g_f, n_f)
    want, n_want = activation_grams(model, X[retain], batch_size=11)
    assert n_r == n_want == len(retain)
    for k in want:
        assert got[k].dtype == torch.float64 and torch.equal(got[k], got[k].T)
        scale = float(want[k].abs().max())
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12 * scale)
        s, s_w = decompose_gram(got[k])[1], decompose_gram(want[k])[1]
        torch.testing.assert_close(s.square(), s_w.square(), rtol=0, atol=1e-10 * scale)
    with pytest.raises(ValueError, match="no retain set"):
        retain_grams_from_full(g_d, n, g_d, n)
    with pytest.raises(ValueError, match="different layers"):
        retain_grams_from_full(g_d, n, {"x": torch.eye(2)}, 1)
