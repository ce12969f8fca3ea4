"""Dataset sources, the prepared format, content hashes, IDX reading and atomic writes."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_lib.config import ConfigError, DataConfig
from pipeline_lib.data.images import (
    get_dataset_loader,
    load_fashion_mnist_source,
    load_prepared,
    prepare_dataset,
    read_idx,
)
from pipeline_lib.io import atomic_path, load_weights, save_weights, state_dict_digest


def _idx_bytes(arr: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = bytes([0, 0, dtype_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray, dtype_code: int = 0x08) -> None:
    data = _idx_bytes(arr, dtype_code)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare_dataset(DataConfig(name="digits", seed=0), out)
    return out


def test_digits_prepare_round_trip(digits_dir: Path) -> None:
    from sklearn.datasets import load_digits

    data = load_prepared(digits_dir, verify=True)
    meta = json.loads((digits_dir / "meta.json").read_text())
    assert data.meta == meta
    assert data.shape == (1, 8, 8) and data.n_classes == 10
    assert len(data.ids) == 1797 == meta["n_train"] + meta["n_test"]
    assert meta["n_test"] == int((data.split == "test").sum())
    assert abs(meta["n_test"] - 0.2 * 1797) <= 10  # stratified rounding per class
    assert set(data.split.tolist()) == {"train", "test"}
    assert data.X.dtype == np.float32 and data.X.shape == (1797, 1, 8, 8)
    assert data.y.dtype == np.int64
    assert 0.0 <= data.X.min() and data.X.max() <= 1.0
    # Ids are derived from the source row, so features match the source exactly.
    bunch = load_digits()
    X, y = data.subset(["digits-0000", "digits-1796"])
    np.testing.assert_array_equal(X[:, 0], bunch.images[[0, 1796]].astype(np.float32) / 16)
    np.testing.assert_array_equal(y, bunch.target[[0, 1796]])
    with pytest.raises(KeyError, match="'digits-9999' is not in the prepared data"):
        data.subset(["digits-9999"])


def test_digits_split_is_stratified(digits_dir: Path) -> None:
    data = load_prepared(digits_dir)
    for c in range(10):
        in_class = data.y == c
        frac = (data.split[in_class] == "test").mean()
        assert abs(frac - 0.2) < 0.02


def test_content_hash_stable_and_seed_sensitive(tmp_path: Path, digits_dir: Path) -> None:
    a = prepare_dataset(DataConfig(name="digits", seed=0), tmp_path / "a")
    b = prepare_dataset(DataConfig(name="digits", seed=0), tmp_path / "b")
    c = prepare_dataset(DataConfig(name="digits", seed=1), tmp_path / "c")
    assert a["content_hash"] == b["content_hash"] == load_prepared(digits_dir).content_hash
    assert (tmp_path / "a" / "samples.parquet").read_bytes() == (
        tmp_path / "b" / "samples.parquet"
    ).read_bytes()
    assert c["content_hash"] != a["content_hash"]
    assert len(a["content_hash"]) == 64


def test_subsample_sizes_and_seed(tmp_path: Path) -> None:
    a = prepare_dataset(
        DataConfig(name="digits", seed=0, max_train=50, max_test=20), tmp_path / "a"
    )
    assert (a["n_train"], a["n_test"]) == (50, 20)
    b = prepare_dataset(
        DataConfig(name="digits", seed=0, max_train=50, max_test=20), tmp_path / "b"
    )
    c = prepare_dataset(
        DataConfig(name="digits", seed=5, max_train=50, max_test=20), tmp_path / "c"
    )
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]


def test_verify_detects_tampering(tmp_path: Path) -> None:
    out = tmp_path / "p"
    prepare_dataset(DataConfig(name="digits", seed=0, max_train=40, max_test=10), out)
    load_prepared(out, verify=True)
    table = pq.read_table(out / "samples.parquet")
    feats = table.column("features").combine_chunks()
    width = feats.type.list_size
    flat = feats.flatten().to_numpy(zero_copy_only=False).copy()
    flat[3 * width + 5] += 0.5  # one feature of one sample
    tampered = table.set_column(
        table.column_names.index("features"),
        "features",
        pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
    )
    pq.write_table(tampered, out / "samples.parquet")
    load_prepared(out, verify=False)  # reads fine without verification
    with pytest.raises(ValueError, match="content hash does not match"):
        load_prepared(out, verify=True)


def test_load_prepared_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_prepared(tmp_path)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ConfigError, match="valid: digits, fashion-mnist, parquet"):
        get_dataset_loader("cifar")


def test_bad_test_fraction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.test_fraction"):
        prepare_dataset(DataConfig(name="digits", test_fraction=1.0), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["imgs-idx3-ubyte", "imgs-idx3-ubyte.gz"])
def test_read_idx_uint8_3d(tmp_path: Path, name: str) -> None:
    arr = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    _write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name)
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_read_idx_big_endian_int32_1d(tmp_path: Path) -> None:
    arr = np.array([1, -2, 70000], dtype=">i4")
    _write_idx(tmp_path / "x.idx", arr, 0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), [1, -2, 70000])


def test_read_idx_errors(tmp_path: Path) -> None:
    arr = np.zeros((2, 2), dtype=np.uint8)
    good = _idx_bytes(arr)
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "short")
    (tmp_path / "type").write_bytes(good[:2] + b"\x07" + good[3:])
    with pytest.raises(ValueError, match="unknown IDX element type 0x07"):
        read_idx(tmp_path / "type")
    (tmp_path / "trunc").write_bytes(good[:-1])
    with pytest.raises(ValueError, match="expected 4 elements, found 3"):
        read_idx(tmp_path / "trunc")


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture()
def fmnist_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fmnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 5, 5), dtype=np.uint8)
        labels = (np.arange(n) % 3).astype(np.uint8)
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


def test_fashion_mnist_keeps_official_split(tmp_path: Path, fmnist_dir: Path) -> None:
    raw = load_fashion_mnist_source(DataConfig(name="fashion-mnist", path=str(fmnist_dir)))
    assert raw.X.shape == (10, 1, 5, 5) and raw.X.dtype == np.float32
    assert raw.ids[0] == "fmnist-train-00000" and raw.ids[6] == "fmnist-test-00000"
    assert raw.split.tolist() == ["train"] * 6 + ["test"] * 4
    images = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(raw.X[:6, 0], images.astype(np.float32) / 255.0)
    # test_fraction is irrelevant when the source has a split.
    meta = prepare_dataset(
        DataConfig(name="fashion-mnist", path=str(fmnist_dir), test_fraction=0.5), tmp_path / "p"
    )
    assert (meta["n_train"], meta["n_test"], meta["shape"]) == (6, 4, [1, 5, 5])
    data = load_prepared(tmp_path / "p", verify=True)
    assert sorted(data.split_ids("train").tolist()) == [f"fmnist-train-{i:05d}" for i in range(6)]
    assert sorted(data.split_ids("test").tolist()) == [f"fmnist-test-{i:05d}" for i in range(4)]


def test_fashion_mnist_plain_files(fmnist_dir: Path) -> None:
    gz = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(gz, "rb") as fh:
        (fmnist_dir / "t10k-labels-idx1-ubyte").write_bytes(fh.read())
    gz.unlink()
    raw = load_fashion_mnist_source(DataConfig(name="fashion-mnist", path=str(fmnist_dir)))
    assert raw.y[6:].tolist() == [0, 1, 2, 0]


def test_fashion_mnist_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist_source(DataConfig(name="fashion-mnist", path=str(tmp_path / "nope")))


def test_fashion_mnist_missing_file(fmnist_dir: Path) -> None:
    (fmnist_dir / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing t10k-images-idx3-ubyte\[\.gz\].*dataset-fashion-mnist"
    ):
        load_fashion_mnist_source(DataConfig(name="fashion-mnist", path=str(fmnist_dir)))


def test_fashion_mnist_count_mismatch(fmnist_dir: Path) -> None:
    _write_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="train images and labels differ in count"):
        load_fashion_mnist_source(DataConfig(name="fashion-mnist", path=str(fmnist_dir)))


# --------------------------------------------------------------------------- parquet


def _parquet(tmp_path: Path, columns: dict) -> DataConfig:
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table(columns), path)
    return DataConfig(name="parquet", path=str(path), seed=0, test_fraction=0.25)


def test_parquet_features_list_column(tmp_path: Path) -> None:
    n = 16
    feats = [[float(i), float(i) / 2, -1.0] for i in range(n)]
    cfg = _parquet(
        tmp_path,
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "label": [i % 4 for i in range(n)],
            "features": feats,
        },
    )
    meta = prepare_dataset(cfg, tmp_path / "p")
    assert meta["shape"] == [3] and meta["n_classes"] == 4
    assert (meta["n_train"], meta["n_test"]) == (12, 4)  # one test sample per class
    data = load_prepared(tmp_path / "p", verify=True)
    X, y = data.subset(["s5"])
    np.testing.assert_array_equal(X, [[5.0, 2.5, -1.0]])
    assert y.tolist() == [1]


def test_parquet_numeric_columns(tmp_path: Path) -> None:
    n = 8
    cfg = _parquet(
        tmp_path,
        {
            "sample_id": [f"r{i}" for i in range(n)],
            "a": np.arange(n, dtype=np.float64),
            "name": [f"n{i}" for i in range(n)],  # not numeric: ignored
            "b": np.arange(n, dtype=np.int32) * 10,
            "label": [i % 2 for i in range(n)],
        },
    )
    raw = get_dataset_loader("parquet")(cfg)
    assert raw.X.shape == (n, 2) and raw.X.dtype == np.float32
    np.testing.assert_array_equal(raw.X[3], [3.0, 30.0])
    assert raw.split is None and raw.n_classes == 2


def test_parquet_split_column_is_kept(tmp_path: Path) -> None:
    split = ["train", "test", "train", "train", "test", "train"]
    cfg = _parquet(
        tmp_path,
        {"sample_id": list("abcdef"), "label": [0, 1, 0, 1, 0, 1], "x": [1.0] * 6, "split": split},
    )
    prepare_dataset(cfg, tmp_path / "p")
    data = load_prepared(tmp_path / "p")
    assert dict(zip(data.ids.tolist(), data.split.tolist(), strict=True)) == dict(
        zip("abcdef", split, strict=True)
    )


def test_parquet_bad_split_value(tmp_path: Path) -> None:
    cfg = _parquet(
        tmp_path,
        {"sample_id": ["a", "b"], "label": [0, 1], "x": [1.0, 2.0], "split": ["train", "val"]},
    )
    with pytest.raises(ValueError, match=r"split column holds .*'val'.*; valid: train, test"):
        get_dataset_loader("parquet")(cfg)


def test_parquet_bad_split_value_quoted_plainly(tmp_path: Path) -> None:
    cfg = _parquet(
        tmp_path,
        {"sample_id": ["a", "b"], "label": [0, 1], "x": [1.0, 2.0], "split": ["train", "val"]},
    )
    with pytest.raises(ValueError) as info:
        get_dataset_loader("parquet")(cfg)
    assert "np.str_" not in str(info.value)


def test_parquet_missing_label(tmp_path: Path) -> None:
    cfg = _parquet(tmp_path, {"sample_id": ["a", "b"], "x": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"missing required column\(s\) label"):
        get_dataset_loader("parquet")(cfg)


def test_parquet_duplicate_ids(tmp_path: Path) -> None:
    cfg = _parquet(
        tmp_path, {"sample_id": ["a", "b", "a"], "label": [0, 1, 0], "x": [1.0, 2.0, 3.0]}
    )
    with pytest.raises(ValueError, match="sample_id values are not unique"):
        get_dataset_loader("parquet")(cfg)


def test_parquet_path_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.path"):
        get_dataset_loader("parquet")(DataConfig(name="parquet"))
    with pytest.raises(FileNotFoundError, match="Parquet table not found"):
        get_dataset_loader("parquet")(
            DataConfig(name="parquet", path=str(tmp_path / "none.parquet"))
        )


# --------------------------------------------------------------------------- atomic writes


def test_atomic_path_file_failure_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_path_dir_failure_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_atomic_path_failure_without_previous_target(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "sub" / "new.txt") as tmp:
            tmp.write_text("x")
            raise RuntimeError("boom")
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_success_replaces_file_and_dir(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("old")
    with atomic_path(f) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "new"
    d = tmp_path / "d"
    d.mkdir()
    (d / "stale.txt").write_text("stale")
    with atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("fresh")
    assert [p.name for p in d.iterdir()] == ["fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]


def test_atomic_path_dir_block_writing_nothing_keeps_target(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_path(target):
            pass  # the block forgot to write anything
    assert (target / "a.txt").read_text() == "old"


def test_prepare_failure_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "p"
    meta = prepare_dataset(DataConfig(name="digits", max_train=30, max_test=10), out)
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"sample_id": ["a"], "label": [0], "x": [1.0], "split": ["train"]}), bad
    )
    with pytest.raises(ValueError, match="must both be non-empty"):
        prepare_dataset(DataConfig(name="parquet", path=str(bad)), out)
    assert load_prepared(out, verify=True).content_hash == meta["content_hash"]


def test_weights_round_trip(tmp_path: Path) -> None:
    import torch

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    digest = save_weights(state, tmp_path / "m.safetensors", {"run": "x"})
    assert digest == state_dict_digest(state)
    back = load_weights(tmp_path / "m.safetensors")
    assert state_dict_digest(back) == digest
    torch.testing.assert_close(back["w"], state["w"], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------- known bugs


def test_read_idx_truncated_header_is_value_error(tmp_path: Path) -> None:
    (tmp_path / "h").write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0]))
    with pytest.raises(ValueError):
        read_idx(tmp_path / "h")


def test_parquet_non_integer_labels_rejected(tmp_path: Path) -> None:
    cfg = _parquet(tmp_path, {"sample_id": ["a", "b"], "label": [0.7, 1.9], "x": [1.0, 2.0]})
    with pytest.raises(ValueError, match="label"):
        get_dataset_loader("parquet")(cfg)
