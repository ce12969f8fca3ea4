"""The attribution store: many models trained on random subsets (or on the retain set, for
oracles), with their masks, seeds and outputs on every target point.

Datamodels (algorithms.md §2) and every oracle-based metric (KLoM, LiRA) need M models. The
unit of work is a *chunk* of consecutive model ids, trained in one process by the vectorised
ensemble trainer (:mod:`pipeline_lib.training.ensemble`). Layout of a store directory::

    manifest.json              config, target ids digest, one entry per finished chunk
    targets.parquet            sample_id, split, label of the T target points, in output order
    chunks/00012/              one directory per chunk, written under a temporary name and
        masks.npy              (K, ceil(N/8)) uint8, bit-packed training masks (np.packbits)
        seeds.npy              (K,) int64 training seeds
        outputs.npy            (K, T, C) float16/float32 logits on the targets
        weights.safetensors    originals and oracles only: the K models' parameters, stacked
        meta.json              model ids, sha256 of each file, seconds, node

Everything about model ``m`` is a pure function of (store seed, m): its mask and its seed. So
a chunk re-run anywhere gives the same models, a finished chunk is skipped after its
checksums verify, and :meth:`AttributionStore.check` proves no model id is missing or
duplicated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from pipeline_lib.io import atomic_path, sha256_file, write_json
from pipeline_lib.models.image import ModelConfig
from pipeline_lib.schema import parse_section
from pipeline_lib.training.fit import FitSettings

log = logging.getLogger(__name__)

_FILES = {
    "masks": "masks.npy",
    "seeds": "seeds.npy",
    "outputs": "outputs.npy",
    "weights": "weights.safetensors",
}

STORE_KINDS = ("subsets", "oracles", "originals")
#: Kinds whose chunks also keep the trained weights (the evaluation unlearns originals and
#: may re-evaluate oracles; subset stores only need outputs and would be too large).
WEIGHT_KINDS = ("oracles", "originals")
_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds; its digest names the store directory.

    ``kind='subsets'``: model m trains on a random subset of exactly round(alpha·N) training
    points. ``kind='oracles'``: every model trains on the same ``base_mask`` (the retain set
    of a request) with its own seed. ``kind='originals'``: every model trains on the whole
    training split with its own seed (the N originals of an evaluation).
    """

    kind: str
    n_models: int
    alpha: float
    seed: int
    chunk_size: int
    n_train: int
    n_classes: int
    data_hash: str
    model: dict[str, Any]
    train: dict[str, Any]
    output_dtype: str = "float16"
    #: Digest of the retain mask (oracles only).
    base_digest: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STORE_KINDS:
            raise ValueError(f"store kind {self.kind!r} unknown; valid: {', '.join(STORE_KINDS)}")
        if self.n_models < 1 or self.chunk_size < 1:
            raise ValueError("n_models and chunk_size must be >= 1")
        if self.kind == "subsets" and not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.output_dtype not in ("float16", "float32"):
            raise ValueError("output_dtype must be float16 or float32")

    @property
    def digest(self) -> str:
        """Digest of everything that determines the models (not n_models/chunking: a store
        grows by adding chunks with the same per-model definitions)."""
        d = asdict(self)
        for k in ("n_models", "chunk_size"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def chunks(self) -> list[tuple[int, int]]:
        """[start, stop) model-id ranges of every chunk."""
        return [
            (s, min(s + self.chunk_size, self.n_models))
            for s in range(0, self.n_models, self.chunk_size)
        ]


def model_seed(store_seed: int, model_id: int) -> int:
    return store_seed * _SEED_STRIDE + model_id


def subset_mask(n_train: int, alpha: float, store_seed: int, model_id: int) -> np.ndarray:
    """(N,) bool mask of exactly round(alpha·N) points, a pure function of (seed, model id)."""
    rng = np.random.default_rng([store_seed, model_id])
    mask = np.zeros(n_train, dtype=bool)
    mask[rng.choice(n_train, size=int(round(alpha * n_train)), replace=False)] = True
    return mask


def chunk_masks(
    spec: StoreSpec, start: int, stop: int, base_mask: np.ndarray | None = None
) -> np.ndarray:
    """(K, N) bool masks of models [start, stop)."""
    if spec.kind == "originals":
        return np.ones((stop - start, spec.n_train), dtype=bool)
    if spec.kind == "oracles":
        if base_mask is None or base_mask.shape != (spec.n_train,):
            raise ValueError("oracle stores need the (N,) retain mask")
        return np.broadcast_to(base_mask, (stop - start, spec.n_train)).copy()
    return np.stack(
        [subset_mask(spec.n_train, spec.alpha, spec.seed, m) for m in range(start, stop)]
    )


def train_chunk(
    spec: StoreSpec,
    start: int,
    stop: int,
    X: np.ndarray,
    y: np.ndarray,
    targets_X: np.ndarray,
    base_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """Train models [start, stop) with the ensemble trainer; return their masks (bool),
    seeds, outputs on the targets (K, T, C) and the seconds spent inside the trainer."""
    from pipeline_lib.training.ensemble import ensemble_logits, train_ensemble

    masks = chunk_masks(spec, start, stop, base_mask)
    seeds = [model_seed(spec.seed, m) for m in range(start, stop)]
    model_cfg = parse_section(ModelConfig, spec.model, "model")
    t = spec.train
    settings = FitSettings(
        t["epochs"], t["batch_size"], t["lr"], t["optimizer"], t["weight_decay"], t["momentum"]
    )
    shape, n_classes = tuple(X.shape[1:]), spec.n_classes
    t0 = time.perf_counter()
    # Arrays from Ray's object store are read-only: copy before torch may write.
    Xt, yt = torch.from_numpy(np.array(X)), torch.from_numpy(np.array(y))
    stacked = train_ensemble(
        model_cfg, shape, n_classes, Xt, yt, torch.from_numpy(masks), seeds, settings
    )
    outputs = ensemble_logits(
        model_cfg, shape, n_classes, stacked, torch.from_numpy(np.array(targets_X))
    )
    seconds = time.perf_counter() - t0
    out = {
        "start": start,
        "stop": stop,
        "masks": masks,
        "seeds": np.asarray(seeds, dtype=np.int64),
        "outputs": outputs.numpy().astype(spec.output_dtype),
        "train_seconds": seconds,
    }
    if spec.kind in WEIGHT_KINDS:
        out["weights"] = {k: v.detach().cpu().contiguous() for k, v in stacked.items()}
    return out


class StoreError(RuntimeError):
    """The store on disk contradicts its manifest (missing/duplicate ids, bad checksums)."""


class AttributionStore:
    """A store directory (see module docstring). Cheap to open; reads chunks on demand."""

    def __init__(self, root: str | Path, spec: StoreSpec) -> None:
        self.root = Path(root)
        self.spec = spec

    # -- layout
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def chunk_dir(self, start: int) -> Path:
        return self.root / "chunks" / f"{start:07d}"

    @classmethod
    def open(cls, root: str | Path) -> AttributionStore:
        root = Path(root)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root}: no attribution store (manifest.json missing)")
        manifest = json.loads((root / "manifest.json").read_text())
        return cls(root, StoreSpec(**manifest["spec"]))

    def initialise(
        self, target_ids: np.ndarray, target_split: np.ndarray, target_labels: np.ndarray
    ) -> None:
        """Create the directory and write targets + manifest (idempotent for the same spec)."""
        if self.manifest_path.is_file():
            existing = json.loads(self.manifest_path.read_text())
            if StoreSpec(**existing["spec"]).digest != self.spec.digest:
                raise StoreError(f"{self.root} holds a store with another specification")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / "targets.parquet") as tmp:
            pq.write_table(
                pa.table({"sample_id": target_ids, "split": target_split, "label": target_labels}),
                tmp,
            )
        write_json(self.manifest_path, {"spec": asdict(self.spec), "chunks": {}})

    # -- chunks
    def write_chunk(
        self, result: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write one chunk atomically (directory renamed into place), then record it in the
        manifest. Returns the chunk's meta."""
        start, stop = int(result["start"]), int(result["stop"])
        if (start, stop) not in self.spec.chunks():
            raise StoreError(f"chunk [{start}, {stop}) is not a chunk of this store")
        arrays = {
            "masks": np.packbits(result["masks"], axis=1),
            "seeds": result["seeds"],
            "outputs": result["outputs"],
        }
        meta: dict[str, Any] = {
            "start": start,
            "stop": stop,
            "train_seconds": result["train_seconds"],
        }
        meta.update(extra or {})
        target = self.chunk_dir(start)
        with atomic_path(target) as tmp:
            tmp.mkdir(parents=True)
            meta["sha256"] = {}
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
                meta["sha256"][name] = sha256_file(tmp / f"{name}.npy")
            if self.spec.kind in WEIGHT_KINDS:
                if "weights" not in result:
                    raise StoreError(f"a {self.spec.kind} chunk must carry the models' weights")
                save_file(result["weights"], str(tmp / _FILES["weights"]))
                meta["sha256"]["weights"] = sha256_file(tmp / _FILES["weights"])
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self._record(start, meta)
        return meta

    def _record(self, start: int, meta: dict[str, Any]) -> None:
        manifest = json.loads(self.manifest_path.read_text())
        manifest["chunks"][f"{start:07d}"] = meta
        write_json(self.manifest_path, manifest)

    def verify_chunk(self, start: int) -> bool:
        """True when the chunk directory exists and every file matches its checksum."""
        d = self.chunk_dir(start)
        if not (d / "meta.json").is_file():
            return False
        meta = json.loads((d / "meta.json").read_text())
        expected = {"masks", "seeds", "outputs"} | (
            {"weights"} if self.spec.kind in WEIGHT_KINDS else set()
        )
        digests = meta.get("sha256", {})
        return set(digests) == expected and all(
            (d / _FILES[name]).is_file() and sha256_file(d / _FILES[name]) == digest
            for name, digest in digests.items()
        )

    def pending_chunks(self) -> list[tuple[int, int]]:
        """Chunks still to train. A chunk that exists but fails its checksums is removed (and
        listed) so it is recomputed; a verified chunk missing from the manifest is recorded."""
        manifest = json.loads(self.manifest_path.read_text())
        pending = []
        for start, stop in self.spec.chunks():
            d = self.chunk_dir(start)
            if self.verify_chunk(start):
                if f"{start:07d}" not in manifest["chunks"]:
                    self._record(start, json.loads((d / "meta.json").read_text()))
                continue
            if d.exists():
                log.warning("chunk %s failed verification; recomputing", d)
                shutil.rmtree(d)
            pending.append((start, stop))
        return pending

    def check(self) -> None:
        """Every model id 0..M-1 present exactly once, every checksum valid."""
        seen = np.zeros(self.spec.n_models, dtype=np.int64)
        for start, _stop in self.spec.chunks():
            if not self.verify_chunk(start):
                raise StoreError(f"chunk {start} missing or corrupt in {self.root}")
            meta = json.loads((self.chunk_dir(start) / "meta.json").read_text())
            seen[meta["start"] : meta["stop"]] += 1
        if not np.all(seen == 1):
            bad = np.flatnonzero(seen != 1)
            raise StoreError(f"model ids missing or duplicated, e.g. {bad[:5].tolist()}")

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(masks (K, N) bool, seeds (K,), outputs (K, T, C)) per chunk, in model-id order."""
        for start, _ in self.spec.chunks():
            d = self.chunk_dir(start)
            masks = np.unpackbits(np.load(d / "masks.npy"), axis=1, count=self.spec.n_train).astype(
                bool
            )
            yield masks, np.load(d / "seeds.npy"), np.load(d / "outputs.npy")

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (masks (M, N) bool, seeds (M,), outputs (M, T, C)); verifies completeness."""
        self.check()
        parts = list(self.iter_chunks())
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def gather(self, columns: np.ndarray, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(masks (M, N) bool, outputs (M, P, C)) for target columns ``columns`` (P,) only.

        Output files are memory-mapped, so only the selected columns are read: a request
        needs a few thousand of the T targets, not the whole (M, T, C) array. ``verify=False``
        skips the checksums (for a caller that has just run :meth:`check`), not the
        completeness of the manifest."""
        if verify:
            self.check()
        elif len(json.loads(self.manifest_path.read_text())["chunks"]) != len(self.spec.chunks()):
            raise StoreError(f"{self.root} is incomplete; train its missing chunks first")
        cols = np.asarray(columns, dtype=np.intp)
        masks, outs = [], []
        for start, _ in self.spec.chunks():
            d = self.chunk_dir(start)
            masks.append(
                np.unpackbits(np.load(d / "masks.npy"), axis=1, count=self.spec.n_train).astype(
                    bool
                )
            )
            outs.append(np.asarray(np.load(d / "outputs.npy", mmap_mode="r")[:, cols]))
        return np.concatenate(masks), np.concatenate(outs)

    def columns_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Target columns of ``sample_ids``; an id the store has no output for is an error."""
        ids = self.targets().column("sample_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        want = np.asarray(sample_ids)
        pos = np.searchsorted(ids, want, sorter=order)
        pos = np.minimum(pos, len(ids) - 1)
        cols = order[pos]
        missing = ids[cols] != want
        if missing.any():
            raise StoreError(
                f"{self.root}: no outputs for sample ids {want[missing][:5].tolist()} (store of other data?)"
            )
        return cols

    def model_weights(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(model id, state dict) of every model, in id order (originals and oracles only)."""
        if self.spec.kind not in WEIGHT_KINDS:
            raise StoreError(f"a {self.spec.kind} store keeps no weights")
        self.check()
        for start, stop in self.spec.chunks():
            stacked = load_file(str(self.chunk_dir(start) / _FILES["weights"]))
            for k in range(stop - start):
                yield start + k, {name: t[k].clone() for name, t in stacked.items()}

    def targets(self) -> pa.Table:
        return pq.read_table(self.root / "targets.parquet")

    def ridge_factor(self, lam: float) -> np.ndarray:
        """Cholesky factor of the store's dual ridge kernel (:func:`datamodels.ridge_factor`),
        computed once per (masks, λ) and cached in the store directory (atomic write, keyed by
        the masks digest so a grown store gets a new one): the request-independent part of
        DM-Direct, like the subset models themselves."""
        from pipeline_lib.attribution.datamodels import ridge_factor

        digest = self.masks_digest()
        path = self.root / f"ridge-factor-{lam:g}-{digest[:16]}.npy"
        if path.is_file():
            return np.load(path)
        masks, _ = self.gather(np.zeros(0, dtype=np.intp), verify=False)
        factor = ridge_factor(masks, lam)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, factor, allow_pickle=False)
        return factor

    def masks_digest(self) -> str:
        """sha256 over all packed masks in model-id order (lineage: which subsets)."""
        h = hashlib.sha256()
        for start, _ in self.spec.chunks():
            h.update((self.chunk_dir(start) / "masks.npy").read_bytes())
        return h.hexdigest()
