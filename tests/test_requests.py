"""Deletion requests: schema, duplicate ids, forget-set extraction, id manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_lib.config import DataConfig
from pipeline_lib.data.images import Prepared, load_prepared, prepare_dataset
from pipeline_lib.data.requests import (
    DeletionRequest,
    RequestError,
    check_unique_ids,
    extract_forget_set,
    load_manifests,
    load_request,
    parse_request,
    write_manifests,
)


def _req(**forget: object) -> dict:
    return {"request_id": "req-1", "reason": "GDPR Art. 17", "forget": forget}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    out = tmp_path_factory.mktemp("prepared") / "digits"
    prepare_dataset(DataConfig(name="digits", seed=0, max_train=80, max_test=30), out)
    return load_prepared(out)


@pytest.fixture()
def tiny() -> Prepared:
    """6 train samples (classes 0, 1, 1, 2, 2, 2) and 2 test samples (classes 0, 3)."""
    ids = np.array(["a0", "a1", "a2", "a3", "a4", "a5", "t0", "t1"])
    split = np.array(["train"] * 6 + ["test"] * 2)
    y = np.array([0, 1, 1, 2, 2, 2, 0, 3], dtype=np.int64)
    X = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    meta = {"shape": [2], "n_classes": 4, "content_hash": "h", "dataset": "tiny"}
    return Prepared(ids, split, X, y, meta)


# --------------------------------------------------------------------------- schema


def test_parse_valid_kinds() -> None:
    r = parse_request(_req(sample_ids=["x-1", 7]))
    assert r.kind == "sample_ids" and r.sample_ids == ("x-1", "7")
    r = parse_request(_req(classes=[3, 1]))
    assert r.kind == "classes" and r.classes == (1, 3)
    r = parse_request(_req(fraction=0.25, seed=4))
    assert r.kind == "fraction" and r.fraction == 0.25 and r.seed == 4


def test_class_shorthand() -> None:
    r = parse_request(_req(**{"class": 3}))
    assert r.kind == "classes" and r.classes == (3,)
    assert r == parse_request(_req(classes=[3]))
    with pytest.raises(RequestError, match="not both"):
        parse_request(_req(**{"class": 3, "classes": [4]}))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"reason": "r", "forget": {"classes": [1]}}, "request_id must be"),
        ({"request_id": "req 1", "reason": "r", "forget": {"classes": [1]}}, "request_id must be"),
        ({"request_id": "req/1", "reason": "r", "forget": {"classes": [1]}}, "request_id must be"),
        ({"request_id": "-req", "reason": "r", "forget": {"classes": [1]}}, "request_id must be"),
        ({"request_id": "r" * 129, "reason": "r", "forget": {"classes": [1]}}, "max 128"),
        ({"request_id": 12, "reason": "r", "forget": {"classes": [1]}}, "request_id must be"),
        ({"request_id": "req-1", "reason": "  ", "forget": {"classes": [1]}}, "reason must be"),
        ({"request_id": "req-1", "forget": {"classes": [1]}}, "reason must be"),
        ({"request_id": "req-1", "reason": "r"}, "forget must be a mapping"),
        ({"request_id": "req-1", "reason": "r", "forget": {}, "extra": 1}, "unknown key 'extra'"),
        (_req(classes=[1], fraction=0.1), r"exactly one of .*\['classes', 'fraction'\]"),
        (_req(seed=1), r"exactly one of .*got none"),
        (_req(sampleids=["a"]), r"unknown key forget\.sampleids"),
        (_req(sample_ids=[]), "sample_ids is empty"),
        (_req(sample_ids="a0"), "must be a list of ids"),
        (_req(sample_ids=["a0", "a1", "a0"]), "lists 'a0' more than once"),
        (_req(classes=[]), "non-empty list of class indices"),
        (_req(classes=[-1]), "non-empty list of class indices"),
        (_req(classes=[True]), "non-empty list of class indices"),
        (_req(classes=[1, 1]), "repeats a class"),
        (_req(fraction=0.0), r"fraction must be a number in \(0, 1\)"),
        (_req(fraction=1.0), r"fraction must be a number in \(0, 1\)"),
        (_req(fraction=1.5), r"fraction must be a number in \(0, 1\)"),
        (_req(fraction=-0.1), r"fraction must be a number in \(0, 1\)"),
        (_req(fraction="0.1"), r"fraction must be a number in \(0, 1\)"),
        (_req(fraction=0.1, seed="x"), "seed must be a non-negative integer"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_schema_errors(raw: object, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        parse_request(raw, "req.yaml")


def test_schema_error_names_source() -> None:
    with pytest.raises(RequestError, match=r"^requests/bad\.yaml: reason"):
        parse_request(
            {"request_id": "ok", "reason": "", "forget": {"class": 1}}, "requests/bad.yaml"
        )


def test_load_request(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="request file not found"):
        load_request(tmp_path / "missing.yaml")
    path = tmp_path / "r.yaml"
    path.write_text("request_id: req-7\nreason: erase\nforget:\n  class: 2\n")
    r = load_request(path)
    assert r == DeletionRequest("req-7", "erase", "classes", classes=(2,))
    path.write_text("request_id: [unclosed\n")
    with pytest.raises(RequestError, match="not valid YAML"):
        load_request(path)


def test_repo_example_request_parses() -> None:
    example = Path(__file__).resolve().parents[1] / "requests" / "example.yaml"
    assert load_request(example).request_id


def test_check_unique_ids_names_both_sources() -> None:
    a = parse_request(_req(classes=[1]))
    b = parse_request({**_req(fraction=0.1), "request_id": "req-2"})
    c = parse_request(_req(fraction=0.2))  # same id as a
    check_unique_ids([("a.yaml", a), ("b.yaml", b)])
    with pytest.raises(RequestError) as info:
        check_unique_ids([("a.yaml", a), ("b.yaml", b), ("c.yaml", c)])
    msg = str(info.value)
    assert "'req-1'" in msg and "a.yaml" in msg and "c.yaml" in msg and "b.yaml" not in msg


def test_digest_is_stable_and_content_sensitive() -> None:
    a = parse_request(_req(classes=[1, 2]))
    assert a.digest == parse_request(_req(classes=[2, 1])).digest
    assert a.digest != parse_request(_req(classes=[1, 3])).digest


# --------------------------------------------------------------------------- extraction


def test_extract_sample_ids(tiny: Prepared) -> None:
    forget, retain = extract_forget_set(parse_request(_req(sample_ids=["a3", "a1"])), tiny)
    assert forget.tolist() == ["a1", "a3"]
    assert retain.tolist() == ["a0", "a2", "a4", "a5"]


def test_extract_rejects_unknown_ids(tiny: Prepared) -> None:
    with pytest.raises(RequestError, match=r"1 unknown sample id\(s\): .*'zz'"):
        extract_forget_set(parse_request(_req(sample_ids=["a1", "zz"])), tiny)
    with pytest.raises(RequestError, match=r"7 unknown sample id\(s\): .*\(and 2 more\)$"):
        extract_forget_set(parse_request(_req(sample_ids=[f"z{i}" for i in range(7)])), tiny)


def test_extract_rejects_test_split_ids(tiny: Prepared) -> None:
    with pytest.raises(RequestError, match=r"1 id\(s\) belong to the test split.*'t1'"):
        extract_forget_set(parse_request(_req(sample_ids=["a1", "t1"])), tiny)


def test_extract_error_quotes_ids_plainly(tiny: Prepared) -> None:
    """Regression: ids were once shown as np.str_('zz')."""
    with pytest.raises(RequestError) as info:
        extract_forget_set(parse_request(_req(sample_ids=["a1", "zz"])), tiny)
    assert str(info.value).endswith("1 unknown sample id(s): 'zz'")
    with pytest.raises(RequestError) as info:
        extract_forget_set(parse_request(_req(sample_ids=["t1", "a1"])), tiny)
    assert str(info.value).endswith("test split, which no model trained on: 't1'")


def test_extract_classes(tiny: Prepared) -> None:
    forget, retain = extract_forget_set(parse_request(_req(classes=[2])), tiny)
    assert forget.tolist() == ["a3", "a4", "a5"]
    assert retain.tolist() == ["a0", "a1", "a2"]


@pytest.mark.parametrize("cls", [3, 9])  # 3 exists only in the test split; 9 nowhere
def test_extract_rejects_classes_without_training_samples(tiny: Prepared, cls: int) -> None:
    with pytest.raises(
        RequestError, match=rf"class\(es\) \[{cls}\] have no training samples.*\[0, 1, 2\]"
    ):
        extract_forget_set(parse_request(_req(classes=[1, cls])), tiny)


def test_extract_rejects_whole_training_split(tiny: Prepared, digits: Prepared) -> None:
    with pytest.raises(RequestError, match="whole training split"):
        extract_forget_set(parse_request(_req(classes=[0, 1, 2])), tiny)
    with pytest.raises(RequestError, match="whole training split"):
        extract_forget_set(parse_request(_req(sample_ids=[f"a{i}" for i in range(6)])), tiny)
    present = sorted(set(digits.y[digits.split == "train"].tolist()))
    with pytest.raises(RequestError, match="whole training split"):
        extract_forget_set(parse_request(_req(classes=present)), digits)


def test_extract_rejects_empty_fraction(digits: Prepared) -> None:
    n_train = int((digits.split == "train").sum())
    with pytest.raises(RequestError, match="forget set is empty"):
        extract_forget_set(parse_request(_req(fraction=0.4 / n_train)), digits)
    # Just above one half sample rounds up to one sample.
    forget, _ = extract_forget_set(parse_request(_req(fraction=0.6 / n_train)), digits)
    assert len(forget) == 1


def test_extract_fraction_is_deterministic_and_partitions_train(digits: Prepared) -> None:
    train = set(digits.split_ids("train").tolist())
    req = parse_request(_req(fraction=0.25, seed=3))
    f1, r1 = extract_forget_set(req, digits)
    f2, r2 = extract_forget_set(parse_request(_req(fraction=0.25, seed=3)), digits)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(r1, r2)
    assert len(f1) == round(0.25 * len(train))
    assert set(f1.tolist()) | set(r1.tolist()) == train
    assert not set(f1.tolist()) & set(r1.tolist())
    assert len(f1) + len(r1) == len(train)
    assert list(f1) == sorted(f1) and list(r1) == sorted(r1)
    f3, _ = extract_forget_set(parse_request(_req(fraction=0.25, seed=4)), digits)
    assert len(f3) == len(f1) and set(f3.tolist()) != set(f1.tolist())


def test_extract_fraction_ignores_row_order(digits: Prepared) -> None:
    perm = np.random.default_rng(0).permutation(len(digits.ids))
    shuffled = Prepared(
        digits.ids[perm], digits.split[perm], digits.X[perm], digits.y[perm], digits.meta
    )
    req = parse_request(_req(fraction=0.3, seed=1))
    np.testing.assert_array_equal(
        extract_forget_set(req, digits)[0], extract_forget_set(req, shuffled)[0]
    )


def test_extract_class_on_digits_matches_labels(digits: Prepared) -> None:
    forget, retain = extract_forget_set(parse_request(_req(**{"class": 4})), digits)
    labels = dict(zip(digits.ids.tolist(), digits.y.tolist(), strict=True))
    assert forget.size > 0 and all(labels[s] == 4 for s in forget)
    assert all(labels[s] != 4 for s in retain)
    assert len(forget) + len(retain) == (digits.split == "train").sum()


# --------------------------------------------------------------------------- manifests


def test_manifest_round_trip_holds_ids_only(tmp_path: Path, digits: Prepared) -> None:
    req = parse_request(_req(fraction=0.2, seed=0))
    forget, retain = extract_forget_set(req, digits)
    out = tmp_path / "forget"
    summary = write_manifests(out, req, forget, retain, digits.meta)
    assert summary["n_forget"] == len(forget) and summary["n_retain"] == len(retain)
    assert summary["data_content_hash"] == digits.content_hash
    assert summary["request_digest"] == req.digest
    assert sorted(p.name for p in out.iterdir()) == [
        "forget_ids.parquet",
        "request.json",
        "retain_ids.parquet",
    ]
    for name in ("forget_ids.parquet", "retain_ids.parquet"):
        assert pq.read_schema(out / name).names == ["sample_id"]
    m = load_manifests(out)
    np.testing.assert_array_equal(m.forget_ids, forget)
    np.testing.assert_array_equal(m.retain_ids, retain)
    assert m.summary == summary
    assert m.summary["request"]["fraction"] == 0.2
    # Rewriting replaces the previous manifests atomically.
    req2 = parse_request(_req(classes=[1]))
    f2, r2 = extract_forget_set(req2, digits)
    write_manifests(out, req2, f2, r2, digits.meta)
    np.testing.assert_array_equal(load_manifests(out).forget_ids, f2)
    assert not [p for p in tmp_path.iterdir() if p.name != "forget"]


def test_load_manifests_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the extract stage first"):
        load_manifests(tmp_path)


# --------------------------------------------------------------------------- known bugs


def test_request_id_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(RequestError, match="request_id must be"):
        parse_request({"request_id": "req-1\n", "reason": "r", "forget": {"class": 1}})


def test_negative_seed_is_a_request_error(tiny: Prepared) -> None:
    with pytest.raises(RequestError, match="seed"):
        req = parse_request(_req(fraction=0.5, seed=-1))
        extract_forget_set(req, tiny)
