"""Attribution store: atomic chunks, checksums, resume, no missing or duplicated model ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline_lib.attribution.store import (
    AttributionStore,
    StoreError,
    StoreSpec,
    chunk_masks,
    model_seed,
    subset_mask,
    train_chunk,
)

N, T, C = 40, 50, 10


def spec(**kw) -> StoreSpec:
    base = dict(
        kind="subsets",
        n_models=10,
        alpha=0.5,
        seed=7,
        chunk_size=4,
        n_train=N,
        n_classes=C,
        data_hash="h",
        model={"name": "mlp", "hidden": [8], "channels": [4]},
        train={
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-2,
            "optimizer": "adam",
            "weight_decay": 0.0,
            "momentum": 0.9,
        },
    )
    base.update(kw)
    return StoreSpec(**base)


def fake_result(s: StoreSpec, start: int, stop: int) -> dict:
    rng = np.random.default_rng(start)
    return {
        "start": start,
        "stop": stop,
        "masks": chunk_masks(s, start, stop),
        "seeds": np.array([model_seed(s.seed, m) for m in range(start, stop)]),
        "outputs": rng.normal(size=(stop - start, T, C)).astype(np.float16),
        "train_seconds": 0.1,
    }


@pytest.fixture
def store(tmp_path):
    s = spec()
    st = AttributionStore(tmp_path / "store", s)
    st.initialise(
        np.array([f"id{i}" for i in range(T)]),
        np.array(["train"] * N + ["test"] * (T - N)),
        np.zeros(T, int),
    )
    return st


def test_masks_are_exact_size_and_pure_functions_of_seed_and_id():
    a = subset_mask(N, 0.5, 3, 11)
    assert a.sum() == 20 and np.array_equal(a, subset_mask(N, 0.5, 3, 11))
    assert not np.array_equal(a, subset_mask(N, 0.5, 3, 12))
    assert not np.array_equal(a, subset_mask(N, 0.5, 4, 11))


def test_chunks_cover_every_model_once():
    s = spec(n_models=10, chunk_size=4)
    assert s.chunks() == [(0, 4), (4, 8), (8, 10)]
    assert spec(n_models=10).digest == spec(n_models=99, chunk_size=3).digest  # stores grow
    assert spec(alpha=0.3).digest != spec().digest


def test_write_resume_and_check(store):
    s = store.spec
    assert store.pending_chunks() == s.chunks()
    with pytest.raises(StoreError, match="missing or corrupt"):
        store.check()
    store.write_chunk(fake_result(s, 0, 4))
    store.write_chunk(fake_result(s, 8, 10))
    assert store.pending_chunks() == [(4, 8)]
    store.write_chunk(fake_result(s, 4, 8))
    assert store.pending_chunks() == []
    store.check()
    masks, seeds, outputs = store.load()
    assert masks.shape == (10, N) and masks.dtype == bool and outputs.shape == (10, T, C)
    assert seeds.tolist() == [model_seed(s.seed, m) for m in range(10)]
    assert np.array_equal(masks, chunk_masks(s, 0, 10))
    manifest = json.loads(store.manifest_path.read_text())
    assert sorted(manifest["chunks"]) == ["0000000", "0000004", "0000008"]
    assert len(store.masks_digest()) == 64


def test_corrupt_chunk_is_detected_and_recomputed(store):
    s = store.spec
    for a, b in s.chunks():
        store.write_chunk(fake_result(s, a, b))
    out = store.chunk_dir(4) / "outputs.npy"
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(StoreError):
        store.check()
    assert store.pending_chunks() == [(4, 8)]  # removed, to be trained again
    assert not store.chunk_dir(4).exists()


def test_chunk_outside_the_spec_is_refused(store):
    with pytest.raises(StoreError, match="not a chunk"):
        store.write_chunk(fake_result(store.spec, 1, 5))


def test_a_different_spec_in_the_same_directory_is_refused(store):
    other = AttributionStore(store.root, spec(alpha=0.25))
    with pytest.raises(StoreError, match="another specification"):
        other.initialise(np.array(["a"]), np.array(["train"]), np.zeros(1, int))


def test_oracle_masks_all_equal_the_retain_mask():
    base = np.arange(N) % 3 != 0
    s = spec(kind="oracles", alpha=float(base.mean()))
    m = chunk_masks(s, 0, 4, base)
    assert (m == base).all()
    with pytest.raises(ValueError, match="retain mask"):
        chunk_masks(s, 0, 4)


def test_train_chunk_trains_each_model_on_its_subset():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 1, 2, 2)).astype(np.float32)
    y = rng.integers(0, C, size=N)
    s = spec(n_models=4)
    res = train_chunk(s, 0, 3, X, y, X[:7])
    assert res["outputs"].shape == (3, 7, C) and res["outputs"].dtype == np.float16
    assert res["masks"].sum(1).tolist() == [20, 20, 20]
    assert res["train_seconds"] > 0
    again = train_chunk(s, 0, 3, X, y, X[:7])
    assert np.array_equal(res["outputs"], again["outputs"])  # deterministic per (seed, id)
