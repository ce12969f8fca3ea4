"""Sharded statistics on a real local Ray: the sum of shard sums equals the unsharded
statistic in float64 for any shard count and any worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_lib.config import ModelConfig, RayConfig, to_dict
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal, id_uniforms
from pipeline_lib.stats.store import (
    CorruptStats,
    find_stats,
    load_stats,
    means,
    read_shard,
    reduce_sums,
    save_stats,
    shard_bounds,
    stats_identity,
    stats_path,
    write_shards,
)

SHAPE = (1, 8, 8)
N_CLASSES = 10
MODELS = {
    "mlp": ModelConfig(name="mlp", hidden=(12,)),
    "cnn": ModelConfig(name="cnn", channels=(3, 4)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield RayConfig(num_cpus=2, cpus_per_task=1)
    ray.shutdown()


def _data(n: int = 37):
    gen = np.random.default_rng(0)
    X = gen.random((n, *SHAPE), dtype=np.float32)
    y = gen.integers(0, N_CLASSES, n)
    ids = np.array([f"s-{i:04d}" for i in range(n)])
    return ids, X, y


def test_shard_bounds_cover_every_row_once():
    for n, k in ((10, 3), (5, 9), (1, 1), (100, 7)):
        b = shard_bounds(n, k)
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(a < c for a, c in b) and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    with pytest.raises(ValueError, match="n_shards"):
        shard_bounds(10, 0)


def test_shards_round_trip(tmp_path):
    ids, X, y = _data()
    paths = write_shards(ids, X, y, tmp_path / "s", 4)
    back = [read_shard(p) for p in paths]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in back]), ids)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in back]), X)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in back]), y)


def test_sampled_labels_keyed_by_id():
    u = id_uniforms(["a", "b", "c"], 0)
    assert np.all((u >= 0) & (u < 1))
    np.testing.assert_array_equal(id_uniforms(["c"], 0), u[2:])  # independent of the others
    assert id_uniforms(["a"], 1)[0] != u[0]


@pytest.mark.parametrize(
    "arch,kind", [("mlp", "true_sampled"), ("mlp", "true_expected"), ("cnn", "true_sampled")]
)
def test_sharded_fisher_equals_unsharded(tmp_path, local_ray, arch, kind):
    from tasks.stats import run_shards

    ids, X, y = _data()
    model = build_model(MODELS[arch], SHAPE, N_CLASSES, seed=1).double()
    whole = fisher_diagonal(
        model, torch.from_numpy(X).double(), torch.from_numpy(y), kind, 16, 5, list(ids)
    )
    state = model.state_dict()
    seen_workers = set()
    for n_shards in (1, 3, 7):
        paths = write_shards(ids, X, y, tmp_path / f"shards-{n_shards}", n_shards)
        for workers in (1, 2):
            out = run_shards(
                "fisher",
                state,
                to_dict(MODELS[arch]),
                SHAPE,
                N_CLASSES,
                paths,
                {"kind": kind, "batch_size": 16, "seed": 5, "dtype": "float64"},
                local_ray,
                workers,
            )
            seen_workers.add(out["workers"])
            sums, n = reduce_sums(out["parts"])
            assert n == len(ids) and len(out["parts"]) == n_shards
            got = means(sums, n)
            assert got.keys() == whole.keys()
            for k in got:
                assert got[k].dtype == torch.float64
                torch.testing.assert_close(got[k], whole[k], rtol=1e-10, atol=1e-14)
    assert seen_workers == {1, 2}


def test_different_seed_gives_different_sampled_fisher():
    ids, X, y = _data()
    model = build_model(MODELS["mlp"], SHAPE, N_CLASSES, seed=1).double()
    Xt, yt = torch.from_numpy(X).double(), torch.from_numpy(y)
    a = fisher_diagonal(model, Xt, yt, "true_sampled", 16, 5, list(ids))
    b = fisher_diagonal(model, Xt, yt, "true_sampled", 16, 6, list(ids))
    assert any(not torch.allclose(a[k], b[k]) for k in a)


def test_stats_file_has_config_and_hash(tmp_path):
    t = {"w": torch.arange(6.0).view(2, 3)}
    digest = save_stats(t, tmp_path / "f.safetensors", {"kind": "true_expected", "n": 3})
    back, meta = load_stats(tmp_path / "f.safetensors")
    torch.testing.assert_close(back["w"], t["w"])
    assert meta["digest"] == digest and meta["config"] == {"kind": "true_expected", "n": 3}
    with pytest.raises(FileNotFoundError, match="statistics file"):
        load_stats(tmp_path / "missing.safetensors")


def test_identity_separates_requests_of_the_same_size():
    ids, _, _ = _data(10)
    opts = {"kind": "true_sampled", "seed": 0}
    a = stats_identity("fisher", "forget", "w" * 64, "d" * 64, ids[:5], opts)
    b = stats_identity("fisher", "forget", "w" * 64, "d" * 64, ids[5:], opts)
    assert a["n"] == b["n"] == 5 and stats_path("s", a) != stats_path("s", b)
    same = stats_identity("fisher", "forget", "w" * 64, "d" * 64, list(ids[:5]), opts)
    assert stats_path("s", same) == stats_path("s", a)
    for changed in (
        stats_identity("fisher", "retain", "w" * 64, "d" * 64, ids[:5], opts),
        stats_identity("fisher", "forget", "v" * 64, "d" * 64, ids[:5], opts),
        stats_identity("fisher", "forget", "w" * 64, "d" * 64, ids[:5], {**opts, "seed": 1}),
    ):
        assert stats_path("s", changed) != stats_path("s", a)


def test_find_stats_verifies_the_file(tmp_path, caplog):
    ids, _, _ = _data(6)
    identity = stats_identity("fisher", "forget", "w" * 64, "d" * 64, ids, {"kind": "x"})
    assert find_stats(tmp_path, identity) is None
    path = stats_path(tmp_path, identity)
    t = {"w": torch.arange(6.0).view(2, 3)}
    save_stats(t, path, {"identity": identity})
    found = find_stats(tmp_path, identity)
    assert found is not None and found[0] == path
    torch.testing.assert_close(found[1]["w"], t["w"])
    # a file that records another identity is not taken for this one
    save_stats(t, path, {"identity": {**identity, "n": 7}})
    assert find_stats(tmp_path, identity) is None
    # a damaged file: load_stats(verify=True) names it; find_stats warns and reports it missing
    save_stats(t, path, {"identity": identity})
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes inf
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptStats, match="do not match the content hash"):
        load_stats(path, verify=True)
    with caplog.at_level("WARNING"):
        assert find_stats(tmp_path, identity) is None
    assert "recomputing" in caplog.text
    path.write_bytes(b"not safetensors")
    with pytest.raises(CorruptStats, match="unreadable"):
        load_stats(path)


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_sharded_activation_stats_equal_stacked_svd(tmp_path, local_ray, arch):
    from pipeline_lib.stats.activations import decompose_grams, stacked_activations
    from tasks.stats import run_shards
    from tests.test_activations import _X, _model, assert_same_space
    from tests.test_activations import MODELS as ARCHS

    model, X = _model(arch), _X(41)
    ids = np.array([f"x{i}" for i in range(len(X))])
    stacked = stacked_activations(model, X)
    for n_shards, workers in ((1, 1), (4, 2)):
        paths = write_shards(
            ids, X.float().numpy(), np.zeros(len(X), int), tmp_path / f"{n_shards}", n_shards
        )
        # float32 shard storage: the reference sees the same rounded inputs
        ref = stacked_activations(model, torch.from_numpy(X.float().numpy()).double())
        out = run_shards(
            "activations",
            model.state_dict(),
            to_dict(ARCHS[arch]),
            SHAPE,
            10,
            paths,
            {"batch_size": 8, "dtype": "float64"},
            local_ray,
            workers,
        )
        grams, n = reduce_sums(out["parts"])
        assert n == len(X) and grams.keys() == stacked.keys()
        us = decompose_grams(grams)
        for name, A in ref.items():
            torch.testing.assert_close(grams[name], A.T @ A, rtol=1e-11, atol=1e-9)
            assert_same_space(grams[name], A)
            assert us[f"{name}.U"].shape == (A.shape[1], A.shape[1])


def test_fisher_pair_keys_sampled_labels_by_id():
    """`comparison.unlearn_one` (unlearn evaluate) computes Fisher through `fisher_pair`; with
    the sample ids it gives the pipeline's values (retain subsample included), whatever the
    order of the rows."""
    from pipeline_lib.config import FisherConfig
    from pipeline_lib.data.requests import Manifests
    from pipeline_lib.modalities.image import fisher_pair, fisher_split_ids

    ids, X, y = _data(30)
    model = build_model(MODELS["mlp"], SHAPE, N_CLASSES, seed=1).double()
    Xt, yt = torch.from_numpy(X).double(), torch.from_numpy(y)
    cfg = FisherConfig(kind="true_sampled", seed=3, max_retain=12, batch_size=8)
    f_rows, r_rows = np.arange(6), np.arange(6, 30)
    fisher_f, fisher_r, n_r = fisher_pair(
        model,
        (Xt[f_rows], yt[f_rows]),
        (Xt[r_rows], yt[r_rows]),
        cfg,
        forget_ids=list(ids[f_rows]),
        retain_ids=list(ids[r_rows]),
    )
    man = Manifests(forget_ids=ids[f_rows], retain_ids=ids[r_rows], summary={})
    r_ids = fisher_split_ids(man, "retain", cfg)
    assert n_r == len(r_ids) == 12
    rows = np.searchsorted(ids, r_ids)
    want_r = fisher_diagonal(model, Xt[rows], yt[rows], "true_sampled", 8, 3, list(r_ids))
    perm = np.array([5, 3, 1, 0, 2, 4])  # the forget rows in another order
    want_f = fisher_diagonal(model, Xt[perm], yt[perm], "true_sampled", 8, 3, list(ids[perm]))
    for k in want_r:
        torch.testing.assert_close(fisher_r[k], want_r[k])
        torch.testing.assert_close(fisher_f[k], want_f[k])


@pytest.mark.parametrize("kind", ["true_expected", "true_sampled", "empirical"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_retain_from_full_equals_direct_retain_fisher(arch, kind):
    """I_R = (Σ_D − Σ_F)/(N − |F|) equals the Fisher diagonal computed over R itself in
    float64, for every per-sample kind (sampled labels are keyed by id, so a sample draws the
    same label in D as in R), whatever rows F takes and in whatever order R comes."""
    from pipeline_lib.stats.fisher import fisher_diagonal_sum
    from pipeline_lib.stats.store import retain_from_full

    ids, X, y = _data(41)
    model = build_model(MODELS[arch], SHAPE, N_CLASSES, 0).double()
    Xt, yt = torch.from_numpy(X).double(), torch.from_numpy(y)
    forget = np.array([3, 7, 8, 20, 33])
    retain = np.setdiff1d(np.arange(len(ids)), forget)[::-1].copy()  # another order
    opts = {"kind": kind, "batch_size": 16, "seed": 3}
    full, n = fisher_diagonal_sum(
        model, Xt, yt, **opts, sample_ids=list(ids), sum_dtype=torch.float64
    )
    f_sums, n_f = fisher_diagonal_sum(
        model, Xt[forget], yt[forget], **opts, sample_ids=list(ids[forget]), sum_dtype=torch.float64
    )
    got = retain_from_full(full, n, f_sums, n_f)
    want = fisher_diagonal(model, Xt[retain], yt[retain], **opts, sample_ids=list(ids[retain]))
    assert n - n_f == len(retain)
    for k in want:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)


def test_retain_from_full_refuses_empty_retain_and_mismatched_tensors():
    from pipeline_lib.stats.store import retain_from_full

    a = {"w": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match="no retain set"):
        retain_from_full(a, 4, a, 4)
    with pytest.raises(ValueError, match="different tensors"):
        retain_from_full(a, 4, {"v": torch.ones(3)}, 1)
    # rounding residue below zero is clamped: a Fisher diagonal is non-negative
    out = retain_from_full(
        {"w": torch.tensor([1.0, 2.0])}, 3, {"w": torch.tensor([1.0 + 1e-16, 1.0])}, 1
    )
    assert (out["w"] >= 0).all() and out["w"][1] == 0.5
