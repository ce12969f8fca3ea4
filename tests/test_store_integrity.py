"""Stores that verify themselves (issue 14, item 5), on real files.

Weights files are checked against the content digest in their metadata and name when loaded
and when a cached task result points at them (a damaged one is removed and recomputed).
The attribution store's chunk ``meta.json`` and ``manifest.json`` carry their own checksums
and are repaired like a chunk; a changed ``chunk_size`` or a grown store works, with the
manifest following the chunks on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.attribution.store import AttributionStore, StoreError, StoreSpec, model_seed
from pipeline_lib.io import (
    WeightsError,
    load_into,
    load_weights,
    save_model,
    save_weights,
    weights_ok,
)
from tests.test_attribution_store import fake_result, spec

N, T = 40, 50


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- weights files


def test_intact_weights_load_and_verify(tmp_path):
    path, digest = save_model(tiny_model(), tmp_path, "original", {"seed": "0"})
    assert Path(path).name == f"original-{digest[:16]}.safetensors"
    assert weights_ok(path, digest) and not weights_ok(path, "0" * 64)
    back = load_into(tiny_model(seed=1), path)
    for a, b in zip(back.state_dict().values(), tiny_model().state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_truncated_weights_file_is_detected(tmp_path):
    path, digest = save_model(tiny_model(), tmp_path, "original", {})
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="unreadable"):
        load_weights(path)
    assert not weights_ok(path, digest)


def test_flipped_tensor_byte_is_detected(tmp_path):
    path, digest = save_model(tiny_model(), tmp_path, "original", {})
    flip_last_byte(Path(path))  # the last tensor's data: safetensors itself does not notice
    with pytest.raises(WeightsError, match="corrupted or edited"):
        load_into(tiny_model(), path)
    assert not weights_ok(path, digest)
    assert load_weights(path, verify=False)  # still parses: only the digest catches it


def test_a_weights_file_under_another_digest_name_is_refused(tmp_path):
    path, _ = save_model(tiny_model(), tmp_path, "original", {})
    other, _ = save_model(tiny_model(seed=3), tmp_path, "original", {})
    Path(path).replace(other)  # right content, wrong name
    with pytest.raises(WeightsError, match="its name says"):
        load_weights(other)


def test_files_named_by_another_key_are_not_misread_as_digest_names(tmp_path):
    # statistics files are named by their identity key, not by their content digest
    path = tmp_path / "fisher-forget-0123456789abcdef.safetensors"
    save_weights({"w": torch.ones(3)}, path, {"config": "{}"})
    assert torch.equal(load_weights(path)["w"], torch.ones(3))


def test_cached_task_with_a_damaged_weights_file_is_recomputed(prefect_api, tmp_path):
    """A cached result whose weights file was truncated: with_files removes it and runs the
    task again (the damaged file was never loaded); an intact one is a cache hit."""
    from prefect import flow, task

    from tasks.compute import CACHED, with_files

    calls = tmp_path / "calls"

    @task(name="integrity-train", **CACHED)
    def train(out_dir: str, seed: int) -> dict:
        with calls.open("a") as fh:
            fh.write("x")
        path, digest = save_model(tiny_model(seed), out_dir, "original", {})
        return {"path": path, "digest": digest}

    @flow(name="integrity-flow")
    def run(out_dir: str, seed: int) -> dict:
        return with_files(train, ("path",), out_dir, seed)

    out, seed = str(tmp_path / "artifacts"), int(tmp_path.stat().st_ino % 100_000)
    first = run(out, seed)
    assert calls.read_text() == "x"
    assert run(out, seed) == first and calls.read_text() == "x"  # cache hit
    data = Path(first["path"]).read_bytes()
    Path(first["path"]).write_bytes(data[:-100])
    again = run(out, seed)
    assert calls.read_text() == "xx"  # recomputed, not loaded
    assert again["path"] == first["path"] and weights_ok(again["path"], first["digest"])


# --------------------------------------------------------------------------- attribution store


def make_store(root: Path, **kw) -> AttributionStore:
    st = AttributionStore(root, spec(**kw))
    st.initialise(
        np.array([f"id{i}" for i in range(T)]),
        np.array(["train"] * N + ["test"] * (T - N)),
        np.zeros(T, int),
    )
    return st


def fill(store: AttributionStore) -> None:
    for start, stop in store.pending_chunks():
        store.write_chunk(fake_result(store.spec, start, stop))


def test_flipped_byte_in_chunk_meta_is_detected_and_recomputed(tmp_path):
    store = make_store(tmp_path / "s")
    fill(store)
    meta_path = store.chunk_dir(4) / "meta.json"
    text = meta_path.read_text()
    meta = json.loads(text)
    # a value change that keeps the JSON valid: the meta's own checksum catches it
    meta_path.write_text(text.replace(f'"stop": {meta["stop"]}', f'"stop": {meta["stop"] + 1}'))
    assert json.loads(meta_path.read_text())["stop"] == meta["stop"] + 1
    with pytest.raises(StoreError, match="chunk 4 missing or corrupt"):
        store.check()
    assert store.pending_chunks() == [(4, 8)] and not store.chunk_dir(4).exists()
    fill(store)
    store.check()
    # a flipped byte that breaks the JSON: no crash, the chunk is recomputed
    flip_last_byte(meta_path)
    meta_path.write_bytes(meta_path.read_bytes()[:-3] + b"\xff{")
    with pytest.raises(StoreError):
        store.check()
    assert store.pending_chunks() == [(4, 8)]


def test_consistent_but_wrong_meta_is_caught_by_the_seeds(tmp_path):
    """A meta.json rewritten with a valid checksum but the wrong model range."""
    from pipeline_lib.attribution.store import _self_digest

    store = make_store(tmp_path / "s")
    fill(store)
    meta_path = store.chunk_dir(4) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["stop"] = 7
    meta["meta_sha256"] = _self_digest(meta, "meta_sha256")
    meta_path.write_text(json.dumps(meta))
    assert not store.verify_chunk(4)
    assert store.pending_chunks() == [(4, 8)]


def test_damaged_manifest_is_refused_clearly_then_rebuilt_from_the_chunks(tmp_path):
    store = make_store(tmp_path / "s")
    fill(store)
    before = store.load()
    flip_last_byte(store.manifest_path)
    with pytest.raises(StoreError, match="manifest.json is damaged") as err:
        AttributionStore.open(store.root)
    assert "\n" not in str(err.value)
    # the training path repairs it: nothing is retrained
    again = make_store(tmp_path / "s")
    assert again.pending_chunks() == []
    reopened = AttributionStore.open(store.root)
    reopened.check()
    for a, b in zip(before, reopened.load(), strict=True):
        assert np.array_equal(a, b)


def test_damaged_targets_file_is_detected_and_rewritten(tmp_path):
    store = make_store(tmp_path / "s")
    fill(store)
    targets = store.root / "targets.parquet"
    good = targets.read_bytes()
    flip_last_byte(targets)
    with pytest.raises(StoreError, match="targets.parquet"):
        store.check()
    make_store(tmp_path / "s")  # initialise rewrites it from the data
    assert targets.read_bytes() == good
    store.check()


def test_a_changed_chunk_size_keeps_the_chunks_and_trains_only_the_gap(tmp_path):
    store = make_store(tmp_path / "s", n_models=10, chunk_size=4)
    fill(store)
    masks, seeds, outputs = store.load()
    resized = make_store(tmp_path / "s", n_models=10, chunk_size=3)
    assert resized.pending_chunks() == []  # [0,4) [4,8) [8,10) are kept as they are
    resized.check()
    for a, b in zip((masks, seeds, outputs), resized.load(), strict=True):
        assert np.array_equal(a, b)
    grown = make_store(tmp_path / "s", n_models=16, chunk_size=3)
    assert grown.pending_chunks() == [(10, 13), (13, 16)]
    fill(grown)
    g_masks, g_seeds, g_outputs = AttributionStore.open(grown.root).load()
    assert g_seeds.tolist() == [model_seed(grown.spec.seed, m) for m in range(16)]
    assert np.array_equal(g_masks[:10], masks) and np.array_equal(g_outputs[:10], outputs)


def test_growing_a_store_from_64_to_72_models_trains_the_8_new_ones(tmp_path):
    store = make_store(tmp_path / "s", n_models=64, chunk_size=32)
    fill(store)
    assert AttributionStore.open(store.root).spec.n_models == 64
    grown = make_store(tmp_path / "s", n_models=72, chunk_size=32)
    assert grown.pending_chunks() == [(64, 72)]
    fill(grown)
    opened = AttributionStore.open(grown.root)
    assert opened.spec.n_models == 72  # the manifest follows the chunks
    masks, seeds, outputs = opened.load()
    assert masks.shape[0] == seeds.shape[0] == outputs.shape[0] == 72
    assert seeds.tolist() == [model_seed(grown.spec.seed, m) for m in range(72)]
    assert len(opened.gather(np.arange(3), verify=False)[0]) == 72


def test_asking_for_fewer_models_reads_the_first_ones(tmp_path):
    store = make_store(tmp_path / "s", n_models=10, chunk_size=4)
    fill(store)
    full = store.masks_digest()
    fewer = make_store(tmp_path / "s", n_models=6, chunk_size=4)
    assert fewer.pending_chunks() == []
    masks, seeds, outputs = fewer.load()
    assert len(masks) == len(seeds) == len(outputs) == 6
    assert seeds.tolist() == [model_seed(fewer.spec.seed, m) for m in range(6)]
    assert fewer.masks_digest() != full
    # the chunk beyond stays on disk and is used again when the store is asked for 10
    assert make_store(tmp_path / "s", n_models=10, chunk_size=4).pending_chunks() == []


def test_overlapping_chunks_left_by_an_older_layout_are_removed(tmp_path):
    """The state an older version left after a chunk-size change: [2,4) beside [0,4)."""
    store = make_store(tmp_path / "s", n_models=10, chunk_size=4)
    fill(store)
    small = make_store(tmp_path / "s", n_models=10, chunk_size=2)
    small.write_chunk(fake_result(small.spec, 2, 4))
    assert small.chunk_dir(2).exists()
    again = make_store(tmp_path / "s", n_models=10, chunk_size=4)
    assert again.pending_chunks() == [] and not again.chunk_dir(2).exists()
    again.check()


def test_chunks_of_another_spec_are_not_taken(tmp_path):
    store = make_store(tmp_path / "s")
    fill(store)
    meta = json.loads((store.chunk_dir(0) / "meta.json").read_text())
    assert meta["spec_digest"] == store.spec.digest
    other = AttributionStore(tmp_path / "s", StoreSpec(**{**spec().__dict__, "seed": 8}))
    assert not other.verify_chunk(0)
