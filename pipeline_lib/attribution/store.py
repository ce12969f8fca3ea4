"""The attribution store: many models trained on random subsets (or on the retain set, for
oracles), with their masks, seeds and outputs on every target point.

Datamodels (algorithms.md §2) and every oracle-based metric (KLoM, LiRA) need M models. The
unit of work is a *chunk* of consecutive model ids, trained in one process by the vectorised
ensemble trainer (:mod:`pipeline_lib.training.ensemble`). Layout of a store directory::

    manifest.json              spec, targets checksum, the chunks that hold models 0..M-1, and
                               its own checksum
    targets.parquet            sample_id, split, label of the T target points, in output order
    chunks/00012/              one directory per chunk, written under a temporary name and
        masks.npy              (K, ceil(N/8)) uint8, bit-packed training masks (np.packbits)
        seeds.npy              (K,) int64 training seeds
        outputs.npy            (K, T, C) float16/float32 logits on the targets
        weights.safetensors    originals and oracles only: the K models' parameters, stacked
        meta.json              model ids, sha256 of each file, seconds, node, its own checksum

Everything about model ``m`` is a pure function of (store seed, m): its mask and its seed. So
a chunk re-run anywhere gives the same models, a finished chunk is skipped after its
checksums verify, and :meth:`AttributionStore.check` proves no model id is missing or
duplicated.

The manifest follows the chunks on disk. A store grows (more models: the missing ids are
trained as new chunks) and its ``chunk_size`` may change (chunks already there are kept; new
ones use the new size), because :meth:`AttributionStore.pending_chunks` lays the chunks that
verify end to end from model 0 and trains only the gaps; a chunk that fails its checksums,
whose ``meta.json`` is damaged, or that overlaps one already laid is removed (a pure function
of the seed, it is trained again). A store asked for fewer models than it holds reads the
first M. The manifest records the last requested spec and the chunks that hold its models.
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

from pipeline_lib.io import atomic_path, sha256_file, stale_temps, write_json
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
    device: torch.device | None = None,
    cpu_parallel: str = "models",
    cpu_block_mib: float = 8.0,
    conv_kernel: str = "vmap",
) -> dict[str, Any]:
    """Train models [start, stop) with the ensemble trainer on ``device`` (default CPU;
    ``cpu_parallel``, ``cpu_block_mib`` and ``conv_kernel`` as in
    :func:`~pipeline_lib.training.ensemble.train_ensemble`); return their masks (bool),
    seeds, outputs on the targets (K, T, C) and the seconds spent inside the trainer (wall
    clock, and this process's CPU time: on a busy machine the two differ)."""
    from pipeline_lib.training.ensemble import ensemble_logits, train_ensemble

    masks = chunk_masks(spec, start, stop, base_mask)
    seeds = [model_seed(spec.seed, m) for m in range(start, stop)]
    model_cfg = parse_section(ModelConfig, spec.model, "model")
    t = spec.train
    settings = FitSettings(
        t["epochs"], t["batch_size"], t["lr"], t["optimizer"], t["weight_decay"], t["momentum"]
    )
    shape, n_classes = tuple(X.shape[1:]), spec.n_classes
    t0, cpu0 = time.perf_counter(), time.process_time()
    # Arrays from Ray's object store are read-only: copy before torch may write.
    Xt, yt = torch.from_numpy(np.array(X)), torch.from_numpy(np.array(y))
    stacked = train_ensemble(
        model_cfg,
        shape,
        n_classes,
        Xt,
        yt,
        torch.from_numpy(masks),
        seeds,
        settings,
        device,
        cpu_parallel=cpu_parallel,
        cpu_block_mib=cpu_block_mib,
        conv_kernel=conv_kernel,
    )
    outputs = ensemble_logits(
        model_cfg,
        shape,
        n_classes,
        stacked,
        torch.from_numpy(np.array(targets_X)),
        device=device,
    )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    out = {
        "start": start,
        "stop": stop,
        "masks": masks,
        "seeds": np.asarray(seeds, dtype=np.int64),
        "outputs": outputs.numpy().astype(spec.output_dtype),
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
    }
    if spec.kind in WEIGHT_KINDS:
        out["weights"] = {k: v.detach().cpu().contiguous() for k, v in stacked.items()}
    return out


class StoreError(RuntimeError):
    """The store on disk contradicts its manifest (missing/duplicate ids, bad checksums)."""


def _self_digest(record: dict[str, Any], field: str) -> str:
    """sha256 of a JSON record without its own checksum ``field``."""
    body = {k: v for k, v in record.items() if k != field}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_record(path: Path, record: dict[str, Any], field: str) -> None:
    """Write ``record`` with its own checksum in ``field``, atomically."""
    body = {k: v for k, v in record.items() if k != field}
    write_json(path, {**body, field: _self_digest(body, field)})


class AttributionStore:
    """A store directory (see module docstring). Cheap to open; reads chunks on demand."""

    def __init__(self, root: str | Path, spec: StoreSpec) -> None:
        self.root = Path(root)
        self.spec = spec
        self._pending: set[tuple[int, int]] = set()

    # -- layout
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def chunk_dir(self, start: int) -> Path:
        return self.root / "chunks" / f"{start:07d}"

    @staticmethod
    def _valid_manifest(root: Path) -> dict[str, Any] | None:
        """The manifest if it parses and matches its checksum (manifests written before the
        checksum existed are accepted once: the next training run rewrites them)."""
        manifest = _read_json(root / "manifest.json")
        if manifest is None or not isinstance(manifest.get("chunks"), dict):
            return None
        if "sha256" in manifest and manifest["sha256"] != _self_digest(manifest, "sha256"):
            return None
        try:
            StoreSpec(**manifest["spec"])
        except (KeyError, TypeError, ValueError):
            return None
        return manifest

    @classmethod
    def open(cls, root: str | Path) -> AttributionStore:
        root = Path(root)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root}: no attribution store (manifest.json missing)")
        manifest = cls._valid_manifest(root)
        if manifest is None:
            raise StoreError(
                f"{root}/manifest.json is damaged (unreadable or checksum mismatch); re-run the "
                "command that trains this store to rebuild it from the chunks"
            )
        return cls(root, StoreSpec(**manifest["spec"]))

    def _targets_sha256(self) -> str | None:
        path = self.root / "targets.parquet"
        return sha256_file(path) if path.is_file() else None

    def _write_manifest(self, chunks: dict[str, Any]) -> None:
        record = {
            "spec": asdict(self.spec),
            "chunks": dict(sorted(chunks.items())),
            "targets_sha256": self._targets_sha256(),
        }
        current = self._valid_manifest(self.root)
        if current is not None and {k: current.get(k) for k in record} == json.loads(
            json.dumps(record)
        ):
            return  # unchanged: a reused store is not rewritten (its mtime says so)
        _write_record(self.manifest_path, record, "sha256")

    def initialise(
        self, target_ids: np.ndarray, target_split: np.ndarray, target_labels: np.ndarray
    ) -> None:
        """Create the directory and write targets + manifest (idempotent for the same spec).
        A damaged manifest or targets file is rewritten (the chunks are found again by
        :meth:`pending_chunks`)."""
        manifest = self._valid_manifest(self.root)
        if manifest is not None:
            if StoreSpec(**manifest["spec"]).digest != self.spec.digest:
                raise StoreError(f"{self.root} holds a store with another specification")
            recorded = manifest.get("targets_sha256")
            current = self._targets_sha256()
            if current is not None and recorded in (None, current):
                return
            log.warning("%s: targets.parquet missing or damaged; rewriting it", self.root)
        elif self.manifest_path.exists():
            log.warning("%s: manifest.json damaged; rebuilding it from the chunks", self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / "targets.parquet") as tmp:
            pq.write_table(
                pa.table({"sample_id": target_ids, "split": target_split, "label": target_labels}),
                tmp,
            )
        self._write_manifest(manifest["chunks"] if manifest is not None else {})

    # -- chunks
    def write_chunk(
        self, result: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write one chunk atomically (directory renamed into place), then record it in the
        manifest. Returns the chunk's meta."""
        start, stop = int(result["start"]), int(result["stop"])
        if (start, stop) not in self._pending and (start, stop) not in self.spec.chunks():
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
            "spec_digest": self.spec.digest,
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
            meta["meta_sha256"] = _self_digest(meta, "meta_sha256")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self._record(start, meta)
        return meta

    def _record(self, start: int, meta: dict[str, Any]) -> None:
        manifest = self._valid_manifest(self.root)
        chunks = manifest["chunks"] if manifest is not None else {}
        chunks[f"{start:07d}"] = meta
        self._write_manifest(chunks)

    def chunk_meta(self, start: int) -> dict[str, Any] | None:
        """The chunk's meta when the chunk verifies, else None: its ``meta.json`` parses and
        matches its own checksum, names this start, this store's spec and a non-empty id range,
        every file matches its sha256, and the seeds are those of its model ids."""
        d = self.chunk_dir(start)
        meta = _read_json(d / "meta.json")
        if meta is None:
            return None
        if "meta_sha256" in meta and meta["meta_sha256"] != _self_digest(meta, "meta_sha256"):
            return None
        stop = meta.get("stop")
        if meta.get("start") != start or not isinstance(stop, int) or stop <= start:
            return None
        if meta.get("spec_digest", self.spec.digest) != self.spec.digest:
            return None
        expected = {"masks", "seeds", "outputs"} | (
            {"weights"} if self.spec.kind in WEIGHT_KINDS else set()
        )
        digests = meta.get("sha256")
        if not isinstance(digests, dict) or set(digests) != expected:
            return None
        if not all(
            (d / _FILES[name]).is_file() and sha256_file(d / _FILES[name]) == digest
            for name, digest in digests.items()
        ):
            return None
        seeds = np.load(d / _FILES["seeds"], allow_pickle=False)
        if seeds.tolist() != [model_seed(self.spec.seed, m) for m in range(start, stop)]:
            return None
        return meta

    def verify_chunk(self, start: int) -> bool:
        """True when the chunk directory exists and verifies (:meth:`chunk_meta`)."""
        return self.chunk_meta(start) is not None

    def _split(self, a: int, b: int) -> list[tuple[int, int]]:
        size = self.spec.chunk_size
        return [(s, min(s + size, b)) for s in range(a, b, size)]

    def pending_chunks(self) -> list[tuple[int, int]]:
        """Chunks still to train for models 0..n_models-1, and the manifest brought in line with
        the chunks on disk.

        The chunks that verify are laid in order from model 0; a chunk that fails verification
        or overlaps one already laid is removed; every gap (a grown store, a removed chunk) is
        cut into new chunks of ``chunk_size``. Chunks beyond n_models stay on disk, out of the
        manifest, for a store grown again."""
        found: dict[int, dict[str, Any]] = {}
        chunks_dir = self.root / "chunks"
        for tmp in stale_temps(chunks_dir):  # a chunk half-written by a killed process
            log.warning("removing %s, left by a process that died writing it", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        for d in sorted(chunks_dir.iterdir()) if chunks_dir.is_dir() else []:
            if not (d.is_dir() and d.name.isdigit()):
                continue
            meta = self.chunk_meta(int(d.name))
            if meta is None:
                log.warning("chunk %s failed verification; recomputing", d)
                shutil.rmtree(d)
                continue
            found[int(d.name)] = meta
        n = self.spec.n_models
        laid: dict[str, Any] = {}
        pending: list[tuple[int, int]] = []
        pos = 0
        for start in sorted(found):
            if start >= n:
                break
            if start < pos:
                log.warning("chunk %s overlaps the chunks before it; removing it", start)
                shutil.rmtree(self.chunk_dir(start))
                continue
            pending += self._split(pos, start)
            laid[f"{start:07d}"] = found[start]
            pos = found[start]["stop"]
        pending += self._split(pos, n)
        self._write_manifest(laid)
        self._pending = set(pending)
        return pending

    def layout(self) -> list[tuple[int, int]]:
        """The [start, stop) chunks that hold models 0..n_models-1, from the manifest (the last
        chunk may reach past n_models: only its first rows are read)."""
        manifest = self._valid_manifest(self.root)
        if manifest is None:
            raise StoreError(
                f"{self.root}/manifest.json is missing or damaged; re-run the command that "
                "trains this store"
            )
        chunks, out, pos = manifest["chunks"], [], 0
        while pos < self.spec.n_models:
            meta = chunks.get(f"{pos:07d}")
            if meta is None:
                raise StoreError(
                    f"chunk {pos} missing or corrupt in {self.root} (models {pos}.. not "
                    "trained); train its missing chunks first"
                )
            out.append((pos, int(meta["stop"])))
            pos = int(meta["stop"])
        return out

    def _rows(self, start: int, stop: int) -> int:
        """How many of the chunk's models are among the first n_models."""
        return min(stop, self.spec.n_models) - start

    def check(self) -> None:
        """Every model id 0..M-1 present exactly once, every checksum valid."""
        manifest = self._valid_manifest(self.root)
        recorded = manifest.get("targets_sha256") if manifest is not None else None
        if recorded is not None and recorded != self._targets_sha256():
            raise StoreError(f"{self.root}/targets.parquet is missing or damaged")
        seen = np.zeros(self.spec.n_models, dtype=np.int64)
        for start, stop in self.layout():
            meta = self.chunk_meta(start)
            if meta is None or meta["stop"] != stop:
                raise StoreError(f"chunk {start} missing or corrupt in {self.root}")
            seen[start : min(stop, self.spec.n_models)] += 1
        if not np.all(seen == 1):
            bad = np.flatnonzero(seen != 1)
            raise StoreError(f"model ids missing or duplicated, e.g. {bad[:5].tolist()}")

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(masks (K, N) bool, seeds (K,), outputs (K, T, C)) per chunk, in model-id order."""
        for start, stop in self.layout():
            d, k = self.chunk_dir(start), self._rows(start, stop)
            masks = np.unpackbits(
                np.load(d / "masks.npy")[:k], axis=1, count=self.spec.n_train
            ).astype(bool)
            yield masks, np.load(d / "seeds.npy")[:k], np.load(d / "outputs.npy")[:k]

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
        cols = np.asarray(columns, dtype=np.intp)
        masks, outs = [], []
        for start, stop in self.layout():  # an incomplete store raises here
            d, k = self.chunk_dir(start), self._rows(start, stop)
            masks.append(
                np.unpackbits(np.load(d / "masks.npy")[:k], axis=1, count=self.spec.n_train).astype(
                    bool
                )
            )
            outs.append(np.asarray(np.load(d / "outputs.npy", mmap_mode="r")[:k, cols]))
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
        for start, stop in self.layout():
            stacked = load_file(str(self.chunk_dir(start) / _FILES["weights"]))
            for k in range(self._rows(start, stop)):
                yield start + k, {name: t[k].clone() for name, t in stacked.items()}

    def targets(self) -> pa.Table:
        return pq.read_table(self.root / "targets.parquet")

    def ridge_factor(self, lam: float) -> np.ndarray:
        """Cholesky factor of the store's ridge system (:func:`datamodels.ridge_factor`: the
        dual kernel, or the primal Gram when the store has more models than training points),
        computed once per (masks, λ) and cached in the store directory (atomic write, keyed by
        the masks digest so a grown store gets a new one): the request-independent part of
        DM-Direct, like the subset models themselves."""
        from pipeline_lib.attribution.datamodels import ridge_factor, ridge_form

        digest = self.masks_digest()
        # "ridge-factor-" names the dual factor (as before the primal form existed)
        form = ridge_form(self.spec.n_models, self.spec.n_train)
        tag = "ridge-factor" if form == "dual" else "ridge-factor-primal"
        path = self.root / f"{tag}-{lam:g}-{digest[:16]}.npy"
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
        for start, stop in self.layout():
            path, k = self.chunk_dir(start) / "masks.npy", self._rows(start, stop)
            if k == stop - start:
                h.update(path.read_bytes())
            else:  # only the first k models of this chunk are the store's
                h.update(np.ascontiguousarray(np.load(path)[:k]).tobytes())
        return h.hexdigest()
