"""Datamodel Matching and Oracle Matching: targets, the fine-tuning, the store pieces they
read, and the ``evaluate`` flow (real Prefect, DVC, MLflow and a local Ray)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline_lib.attribution.datamodels import forget_shift_direct, ridge_primal_reference
from pipeline_lib.attribution.matching import (
    MatchTargets,
    datamodel_targets,
    full_model_anchor,
    match_outputs,
    matching_retain_rows,
    oracle_targets,
)
from pipeline_lib.config import ModelConfig, TrainConfig
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.methods.matching import DmmParams
from pipeline_lib.models.image import build_model
from tests.conftest import REPO, make_dvc_project


def test_dm_direct_targets_recover_the_retrained_output_of_a_linear_world():
    """When outputs are exactly linear in the training mask, DM-Direct must give the output
    of the model trained without F: f(all) − Σ_F β = f(all \\ F)."""
    rng = np.random.default_rng(0)
    M, N, P, C = 400, 30, 5, 3
    beta = rng.normal(size=(P, C, N))
    bias = rng.normal(size=(P, C))
    masks = rng.random((M, N)) < 0.5
    outputs = np.einsum("mn,pcn->mpc", masks.astype(float), beta) + bias
    forget = np.array([2, 7, 11, 29])
    full = beta.sum(-1) + bias
    keep = np.ones(N)
    keep[forget] = 0
    retrained = beta @ keep + bias
    got = datamodel_targets(masks, outputs, full, forget, lam=1e-6)
    assert got.shape == (P, C)
    np.testing.assert_allclose(got, retrained, atol=1e-4)
    # and it is not trivially the full output
    assert np.abs(full - retrained).max() > 0.5


def _fixed_size_world(seed: int = 0, M: int = 400, N: int = 30, P: int = 5, C: int = 3):
    """Outputs exactly linear in the mask, subsets of exactly N/2 points (the store's draw),
    β with a common part (training on fewer points lowers every output)."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=(P, C, N)) + 0.4
    bias = rng.normal(size=(P, C))
    masks = np.zeros((M, N), dtype=bool)
    for j in range(M):
        masks[j, rng.permutation(N)[: N // 2]] = True
    outputs = np.einsum("mn,pcn->mpc", masks.astype(float), beta) + bias
    return beta, bias, masks, outputs


def test_dm_direct_anchor_recovers_the_retrained_output_with_fixed_size_subsets():
    """With exactly-αN subsets the common part of β is invisible to the store: plain
    DM-Direct misses |F|·κ, the full-model anchor recovers f(D \\ F) exactly."""
    beta, bias, masks, outputs = _fixed_size_world()
    forget = np.array([2, 7, 11, 29])
    full = beta.sum(-1) + bias
    keep = np.ones(masks.shape[1])
    keep[forget] = 0
    retrained = beta @ keep + bias
    plain = datamodel_targets(masks, outputs, full, forget, lam=1e-6)
    anchored = datamodel_targets(masks, outputs, full, forget, lam=1e-6, anchor=True)
    np.testing.assert_allclose(anchored, retrained, atol=1e-4)
    # the unanchored targets are off by about |F| times the mean coefficient
    gap = plain - retrained
    np.testing.assert_allclose(gap, len(forget) * beta.mean(-1), atol=1e-4)
    assert np.abs(gap).min() > 0.5
    # stacked trained models: one anchor each, equal to the single-model call
    stacked = full_model_anchor(masks, outputs, np.stack([full, full + 1.0]), 4, lam=1e-6)
    np.testing.assert_allclose(
        stacked[0], full_model_anchor(masks, outputs, full, 4, lam=1e-6), atol=1e-12
    )
    np.testing.assert_allclose(stacked[1] - stacked[0], 4 / 15, atol=1e-9)  # |F| / ((1-α)N)


def test_dm_direct_anchor_from_reference_logits():
    """``anchor_logits`` pins the anchor at other full-data outputs (the mean of reference
    models): the same as the trained model's anchor when they are equal, and otherwise moved by
    |F| / Σ(1 − x̄) times the difference — the share of the trained model's own deviation that
    the reference mean leaves in its target."""
    beta, bias, masks, outputs = _fixed_size_world()
    forget = np.array([2, 7, 11, 29])
    full = beta.sum(-1) + bias
    own = datamodel_targets(masks, outputs, full, forget, lam=1e-6, anchor=True)
    same = datamodel_targets(
        masks, outputs, full, forget, lam=1e-6, anchor=True, anchor_logits=full
    )
    np.testing.assert_allclose(same, own, atol=1e-12)
    delta = np.random.default_rng(0).normal(size=full.shape)
    moved = datamodel_targets(
        masks, outputs, full, forget, lam=1e-6, anchor=True, anchor_logits=full + delta
    )
    np.testing.assert_allclose(moved - own, -(4 / 15) * delta, atol=1e-8)  # |F| / ((1-α)N)
    # without the anchor the reference logits are not used
    plain = datamodel_targets(masks, outputs, full, forget, lam=1e-6)
    np.testing.assert_allclose(
        datamodel_targets(masks, outputs, full, forget, lam=1e-6, anchor_logits=full + delta),
        plain,
    )
    with pytest.raises(ValueError, match="anchor logits shape"):
        datamodel_targets(
            masks, outputs, full, forget, lam=1e-6, anchor=True, anchor_logits=full[:2]
        )


def test_anchor_reference_reads_dmm_params():
    from pipeline_lib.methods.matching import DmmParams, OracleMatchingParams, anchor_reference

    assert anchor_reference(DmmParams()) is None  # default: the unlearned model itself
    assert anchor_reference(DmmParams(anchor_models=8)) == (8, 300)
    assert anchor_reference(DmmParams(anchor_models=8, anchor=False)) is None
    assert anchor_reference(OracleMatchingParams()) is None


def test_dm_direct_anchor_is_zero_when_subset_sizes_identify_beta():
    """Bernoulli masks identify the common part; the anchor of an exactly linear world is 0
    (both estimators), so anchored and plain targets agree."""
    rng = np.random.default_rng(1)
    M, N, P, C = 600, 20, 4, 2
    beta = rng.normal(size=(P, C, N)) + 0.3
    bias = rng.normal(size=(P, C))
    masks = rng.random((M, N)) < 0.5
    outputs = np.einsum("mn,pcn->mpc", masks.astype(float), beta) + bias
    full = beta.sum(-1) + bias
    np.testing.assert_allclose(full_model_anchor(masks, outputs, full, 3, lam=1e-6), 0.0, atol=1e-5)
    forget = np.array([0, 5, 9])
    np.testing.assert_allclose(
        datamodel_targets(masks, outputs, full, forget, lam=1e-6, anchor=True),
        datamodel_targets(masks, outputs, full, forget, lam=1e-6),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="full logits"):
        full_model_anchor(masks, outputs, full[:, :1], 3)
    with pytest.raises(ValueError, match=r"\|F\|"):
        full_model_anchor(masks, outputs, full, N)


def test_weighted_forget_shift_matches_the_dense_weighted_sum():
    beta, _, masks, outputs = _fixed_size_world(seed=3, M=200, N=24, P=3, C=2)
    idx = np.array([1, 4, 8, 20])
    w = np.array([0.5, -1.0, 2.0, 0.25])
    dense = ridge_primal_reference(masks, outputs, lam=0.7)[0].reshape(-1, masks.shape[1])
    want = (dense[:, idx] @ w).reshape(outputs.shape[1:])
    got = forget_shift_direct(masks, outputs, idx, lam=0.7, weights=w)
    np.testing.assert_allclose(got, want, atol=1e-9)
    with pytest.raises(ValueError, match="weights"):
        forget_shift_direct(masks, outputs, idx, lam=0.7, weights=w[:2])


def test_oracle_targets_are_the_mean_and_shapes_are_checked():
    z = np.arange(24, dtype=float).reshape(2, 4, 3)
    np.testing.assert_allclose(oracle_targets(z), z.mean(0))
    with pytest.raises(ValueError, match="oracle logits"):
        oracle_targets(z[0])
    with pytest.raises(ValueError, match="store outputs"):
        datamodel_targets(np.ones((3, 4), bool), np.ones((2, 5, 2)), np.zeros((5, 2)), [0])


def test_matching_rows_are_seeded_and_bounded():
    a = matching_retain_rows(10, 100, 3.0, seed=1)
    assert len(a) == 30 and len(set(a.tolist())) == 30 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, matching_retain_rows(10, 100, 3.0, seed=1))
    assert not np.array_equal(a, matching_retain_rows(10, 100, 3.0, seed=2))
    assert len(matching_retain_rows(50, 20, 3.0, seed=0)) == 20  # capped at |R|
    with pytest.raises(ValueError, match="empty"):
        matching_retain_rows(0, 20, 3.0, seed=0)


def test_match_targets_reject_bad_inputs():
    X = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="differ in number"):
        MatchTargets(X, torch.zeros(3, 2), 1, "oracles")
    with pytest.raises(ValueError, match="NaN"):
        MatchTargets(X, torch.full((4, 2), float("nan")), 1, "oracles")
    with pytest.raises(ValueError, match="n_forget"):
        MatchTargets(X, torch.zeros(4, 2), 0, "oracles")


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 8, generator=g)
    y = (X[:, 0] > 0).long()
    return X, y


def test_match_outputs_moves_logits_to_the_targets(one_thread):
    X, _ = _toy()
    cfg = ModelConfig(name="mlp", hidden=(16,), channels=(4,))
    model = build_model(cfg, (8,), 2, seed=0)
    teacher = build_model(cfg, (8,), 2, seed=1)
    with torch.no_grad():
        T = teacher(X)
    info = match_outputs(model, MatchTargets(X, T, 16, "oracles"), 60, 5e-3, 16, 0.95, 0.0, 0)
    assert info["mse_all_after"] < 0.2 * info["mse_all_before"]
    assert info["mse_forget_after"] < info["mse_forget_before"]
    # the weight regulariser pulls towards θ0: a huge λ keeps the model nearly where it was
    held = build_model(cfg, (8,), 2, seed=0)
    w0 = [p.detach().clone() for p in held.parameters()]
    match_outputs(held, MatchTargets(X, T, 16, "oracles"), 60, 5e-3, 16, 0.95, 1e3, 0)
    moved_reg = sum(float((p - q).abs().sum()) for p, q in zip(held.parameters(), w0, strict=True))
    moved = sum(
        float((p - q).abs().sum())
        for p, q in zip(
            model.parameters(), build_model(cfg, (8,), 2, seed=0).parameters(), strict=True
        )
    )
    assert moved_reg < 0.2 * moved


def test_dmm_method_needs_datamodel_targets(one_thread):
    X, y = _toy()
    cfg = ModelConfig(name="mlp", hidden=(16,), channels=(4,))
    model = build_model(cfg, (8,), 2, seed=0)
    inputs = UnlearnInputs(
        X[:8], y[:8], X[8:], y[8:], lambda s: build_model(cfg, (8,), 2, s), TrainConfig()
    )
    dmm = get_method("dmm")
    with pytest.raises(ValueError, match="datamodels"):
        dmm.fn(model, inputs, DmmParams(), 0)
    wrong = UnlearnInputs(
        X[:8],
        y[:8],
        X[8:],
        y[8:],
        lambda s: build_model(cfg, (8,), 2, s),
        TrainConfig(),
        match=MatchTargets(X[:32], torch.zeros(32, 2), 8, "oracles"),
    )
    with pytest.raises(ValueError, match="datamodels"):
        dmm.fn(model, wrong, DmmParams(), 0)
    ok = UnlearnInputs(
        X[:8],
        y[:8],
        X[8:],
        y[8:],
        lambda s: build_model(cfg, (8,), 2, s),
        TrainConfig(),
        match=MatchTargets(X[:32], torch.zeros(32, 2), 8, "datamodels", seconds=0.5),
    )
    _, info = dmm.fn(model, ok, DmmParams(epochs=20, lr=1e-2), 0)
    assert info["mse_all_after"] < info["mse_all_before"] and info["target_seconds"] == 0.5


def test_originals_store_keeps_weights_that_reproduce_its_outputs(tmp_path: Path, one_thread):
    from pipeline_lib.attribution.store import AttributionStore, StoreError, StoreSpec, train_chunk
    from pipeline_lib.training.fit import predict_logits

    X, y = _toy()
    spec = StoreSpec(
        kind="originals",
        n_models=4,
        alpha=1.0,
        seed=0,
        chunk_size=2,
        n_train=48,
        n_classes=2,
        data_hash="x",
        model={"name": "mlp", "hidden": [8], "channels": [4]},
        train={
            "epochs": 2,
            "batch_size": 16,
            "lr": 1e-2,
            "optimizer": "adam",
            "weight_decay": 0.0,
            "momentum": 0.9,
        },
        output_dtype="float32",
    )
    store = AttributionStore(tmp_path / "s", spec)
    store.initialise(np.arange(64), np.array(["train"] * 48 + ["test"] * 16), y.numpy())
    for start, stop in spec.chunks():
        out = train_chunk(spec, start, stop, X[:48].numpy(), y[:48].numpy(), X.numpy())
        assert out["masks"].all()
        store.write_chunk(out)
    store.check()
    _, _, outputs = store.load()
    cfg = ModelConfig(name="mlp", hidden=(8,), channels=(4,))
    for k, state in store.model_weights():
        m = build_model(cfg, (8,), 2, seed=0)
        m.load_state_dict(state)
        np.testing.assert_allclose(predict_logits(m, X).numpy(), outputs[k], rtol=1e-4, atol=1e-5)
    cols = store.columns_of(np.array([5, 60, 0]))
    assert cols.tolist() == [5, 60, 0]
    masks, gathered = store.gather(cols)
    assert masks.shape == (4, 48) and np.array_equal(gathered, outputs[:, cols])
    with pytest.raises(StoreError, match="no outputs"):
        store.columns_of(np.array([999]))
    # the ridge factor is computed once and cached in the store
    factor = store.ridge_factor(0.5)
    cached = list(store.root.glob("ridge-factor-0.5-*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), factor)
    np.testing.assert_allclose(factor @ factor.T, 0.5 * np.eye(4), atol=1e-12)  # all-ones masks
    # a chunk whose weights file is gone fails verification
    (store.chunk_dir(2) / "weights.safetensors").unlink()
    assert not store.verify_chunk(2) and store.pending_chunks() == [(2, 4)]


# ------------------------------------------------------------------------- the flow


def _params(root: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(max_train=240, max_test=80)
    params["model"].update(hidden=[32])
    params["train"].update(epochs=15)
    params["request"].update(file="requests/r.yaml")
    params["attribution"].update(n_models=48, chunk_size=12, lds_heldout=0)
    # more steps than the paper's defaults: the test's forget set is 12 points (one batch)
    params["unlearn"]["oracle_matching"].update(n_oracles=4, epochs=30, lr=5e-3)
    for m in ("finetune", "neggrad_plus"):
        params["unlearn"][m].update(epochs=1)
    params["evaluate"].update(n_models=4)
    params["ray"].update(num_cpus=2)
    params["tracking"].update(
        mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="eval-test", dvc_root=str(root)
    )
    return params


def test_evaluate_flow_compares_methods_and_records_runs(prefect_api, tmp_path: Path):
    import ray
    from mlflow import MlflowClient

    from flows.evaluate import NONE_ROW, evaluate_flow
    from pipeline_lib.attribution.store import AttributionStore

    root = make_dvc_project(tmp_path / "proj", yaml.safe_dump(_params(tmp_path / "proj")))
    (root / "requests" / "r.yaml").write_text(
        "request_id: eval-1\nreason: test\nforget:\n  fraction: 0.05\n  seed: 3\n"
    )
    methods = ["dmm", "oracle_matching", "neggrad_plus"]
    try:
        result = evaluate_flow(params_path=str(root / "params.yaml"), methods=methods)
        with open(result["files"]["comparison.csv"]) as fh:
            table = list(csv.DictReader(fh))
        md = Path(result["files"]["comparison.md"]).read_text()
        # dmm's anchor from 3 reference models trained on D (their own store and seed)
        again = evaluate_flow(
            params_path=str(root / "params.yaml"),
            overrides={"unlearn.dmm.anchor_models": 3},
            methods=["dmm"],
        )
        refs = [
            AttributionStore.open(d)
            for d in (root / "artifacts" / "attribution").glob("originals-*")
        ]
    finally:
        ray.shutdown()
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == [NONE_ROW, *methods, "oracle (retrain)"]
    for r in rows.values():
        assert r["n_models"] == 4
        for split in ("forget", "retain", "validation"):
            assert np.isfinite(r[f"klom_{split}_p95"]) and r[f"klom_{split}_p95"] >= 0
    # matching the oracles' mean logits must bring the forget margins closer to the oracles'
    # than doing nothing does (KLoM itself is too noisy at N = 4 to assert on)
    assert rows["oracle_matching"]["margin_gap_forget"] < 0.8 * rows[NONE_ROW]["margin_gap_forget"]
    assert rows[NONE_ROW]["RA"] > 60  # the models are trained
    assert rows["dmm"]["seconds"] > 0 and rows["dmm"]["time_over_retrain"] > 0
    assert rows["oracle (retrain)"]["klom_forget_p95"] == result["floor"]["forget"]["p95"]
    assert [t["method"] for t in table] == list(rows)
    assert "| dmm |" in md and "noise floor" in md
    assert Path(result["files"]["klom.png"]).stat().st_size > 10_000
    # the second run reused every store: the same originals and oracles give the same row
    again_rows = {r["method"]: r for r in again["rows"]}
    assert again_rows[NONE_ROW]["klom_forget_p95"] == rows[NONE_ROW]["klom_forget_p95"]
    # ... and a second originals store, of the reference models, changed dmm's targets
    assert sorted((r.spec.n_models, r.spec.seed) for r in refs) == [(3, 300), (4, 100)]
    assert again_rows["dmm"]["margin_gap_forget"] != rows["dmm"]["margin_gap_forget"]

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = client.get_run(result["run_id"])
    assert parent.data.tags["kind"] == "evaluation" and parent.info.status == "FINISHED"
    assert "noise_floor.forget.p95" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(result["run_id"], "comparison")}
    assert {"comparison/comparison.md", "comparison/comparison.csv", "comparison/klom.png"} <= arts
    for name, child_id in result["children"].items():
        child = client.get_run(child_id)
        assert child.data.tags["mlflow.parentRunId"] == result["run_id"]
        assert child.data.metrics["klom_forget_p95"] == pytest.approx(rows[name]["klom_forget_p95"])
    assert client.get_run(result["children"]["dmm"]).data.params["unlearn.dmm.lr"] == "0.0005"


def test_anchor_reference_models_must_not_be_the_originals():
    """An anchor store seeded like the evaluation's originals would hold the very models being
    unlearned: refused before anything is trained, naming both keys."""
    from pipeline_lib.config import load_params
    from tasks.stores import anchor_outputs_for

    params = load_params(
        REPO / "params.yaml", {"unlearn.dmm.anchor_models": 2, "unlearn.dmm.anchor_seed": 100}
    )
    with pytest.raises(ValueError, match="anchor_seed 100 equals evaluate.originals_seed"):
        anchor_outputs_for(params.unlearn.dmm, params, None, None)
    assert (
        anchor_outputs_for(load_params(REPO / "params.yaml").unlearn.dmm, params, None, None)
        is None
    )
