"""Prefect tasks of the attribution stores (subset models, originals, oracles): the store of a
params set and data, trained on Ray where models are missing, with terminal and Prefect
progress; datamodel LDS on a finished store. The attribution, evaluation and unlearning flows
share them.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from pipeline_lib.attribution.store import AttributionStore, StoreSpec
from pipeline_lib.config import Params, to_dict
from pipeline_lib.data.images import Prepared, load_prepared
from pipeline_lib.methods.matching import anchor_reference
from tasks import attribution as ray_attr

RETRY = dict(retries=2, retry_delay_seconds=2)


def store_spec(
    params: Params,
    data: Prepared,
    kind: str,
    n_models: int,
    base_mask: np.ndarray | None,
    seed: int | None = None,
) -> StoreSpec:
    """The store of ``kind`` for these params and data; ``seed`` overrides attribution.seed."""
    a = params.attribution
    train = to_dict(params.train)
    if a.epochs is not None:
        train["epochs"] = a.epochs
    train = {
        k: train[k] for k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "momentum")
    }
    base_digest = ""
    if base_mask is not None:
        base_digest = hashlib.sha256(np.packbits(base_mask).tobytes()).hexdigest()
    return StoreSpec(
        kind=kind,
        n_models=n_models,
        alpha=a.alpha
        if kind == "subsets"
        else (1.0 if base_mask is None else float(base_mask.mean())),
        seed=a.seed if seed is None else seed,
        chunk_size=a.chunk_size,
        n_train=int((data.split == "train").sum()),
        n_classes=data.n_classes,
        data_hash=data.content_hash,
        model=to_dict(params.model),
        train=train,
        output_dtype=a.output_dtype,
        base_digest=base_digest,
    )


class Progress:
    """Terminal bar (tqdm: models done, models/s, ETA) plus a Prefect progress artifact."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.bar = None
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=key, description="models trained"
        )

    def __call__(self, done: int, total: int, meta: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:  # the first call reports chunks already in the store
            self.bar = tqdm(
                total=total, initial=done, unit="model", file=sys.stderr, dynamic_ncols=True
            )
        else:
            self.bar.update(done - self.bar.n)
        update_progress_artifact(self.artifact_id, progress=100.0 * done / total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@task(name="train-attribution-store", **RETRY)
def train_store(
    store_root: str,
    spec: StoreSpec,
    prepared_dir: str,
    ray_cfg: dict,
    base_mask: list[bool] | None,
    key: str,
) -> dict[str, Any]:
    """Train every missing chunk on Ray (a retry resumes from the finished chunks)."""
    from pipeline_lib.config import RayConfig, parse_section

    logger = get_run_logger()
    data = load_prepared(prepared_dir)
    order = np.argsort(data.ids, kind="stable")
    train_rows = order[data.split[order] == "train"]
    target_rows = np.concatenate([train_rows, order[data.split[order] == "test"]])
    store = AttributionStore(store_root, spec)
    store.initialise(data.ids[target_rows], data.split[target_rows], data.y[target_rows])
    cfg = parse_section(RayConfig, ray_cfg, "ray")
    logger.info("Ray: %s; store %s", ray_attr.connect(cfg), store_root)
    progress = Progress(key)
    try:
        stats = ray_attr.run_store(
            store,
            data.X[train_rows],
            data.y[train_rows],
            data.X[target_rows],
            cfg,
            np.asarray(base_mask, dtype=bool) if base_mask is not None else None,
            progress,
        )
    finally:
        progress.close()
    store.check()
    stats["masks_digest"] = store.masks_digest()
    logger.info(
        "trained %d models in %.1fs (%.2f models/s, overhead %.1f%%)",
        stats["models_trained"],
        stats["wall_seconds"],
        stats.get("models_per_second", 0.0),
        100 * stats["overhead_fraction"],
    )
    return stats


def ensure_store(
    params: Params,
    data: Prepared,
    kind: str,
    n_models: int,
    base_mask: np.ndarray | None = None,
    seed: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """Train whatever ``n_models`` models of this store are missing (nothing when complete) and
    return (store directory, stats with its masks digest). For use inside a flow."""
    spec = store_spec(params, data, kind, n_models, base_mask, seed)
    store_root = store_dir(params, spec)
    return str(store_root), train_spec(params, spec, store_root, base_mask)


def anchor_outputs_for(
    method_params: Any, params: Any, data: Any, originals: AttributionStore
) -> np.ndarray | None:
    """(K, T, C) float32 logits of dmm's anchor reference models (``anchor_models`` > 0) on
    the target points of the evaluation's ``originals`` store, trained on Ray the first time
    like them; None when the anchor does not use them. For use inside a flow. Their seed must
    differ from the originals' (ValueError naming both keys)."""
    ref = anchor_reference(method_params)
    if ref is None:
        return None
    if ref[1] == params.evaluate.originals_seed:
        raise ValueError(
            f"unlearn.dmm.anchor_seed {ref[1]} equals evaluate.originals_seed: the reference "
            "models would be the originals being unlearned; choose another seed"
        )
    root, _ = ensure_store(params, data, "originals", ref[0], None, ref[1])
    store = AttributionStore.open(root)
    want = originals.targets().column("sample_id").to_numpy()
    if not np.array_equal(store.targets().column("sample_id").to_numpy(), want):
        raise RuntimeError(f"{root}: the anchor reference models have other target points")
    _, _, out = store.load()
    return out.astype(np.float32)


def store_dir(params: Params, spec: StoreSpec) -> Path:
    """Where the store of ``spec`` lives: named by its kind and digest."""
    return params.resolve(params.attribution.out_dir) / f"{spec.kind}-{spec.digest[:16]}"


def train_spec(
    params: Params, spec: StoreSpec, store_root: Path, base_mask: np.ndarray | None
) -> dict[str, Any]:
    """Run :func:`train_store` for ``spec`` with the data and Ray settings of ``params``."""
    return train_store(
        str(store_root),
        spec,
        str(params.resolve(params.data.out_dir)),
        to_dict(params.ray),
        base_mask.tolist() if base_mask is not None else None,
        f"{spec.kind}-{spec.digest[:12]}",
    )


@task(name="datamodel-lds")
def datamodel_lds(store_root: str, heldout: int, estimator: str, lam: float) -> dict[str, float]:
    """Fit datamodels on the first M−H models; LDS of margins on the last H (test targets
    and train targets separately)."""
    from pipeline_lib.attribution.datamodels import fit_datamodels, lds, margins

    store = AttributionStore.open(store_root)
    masks, _, outputs = store.load()
    labels = store.targets().column("label").to_numpy()
    split = np.asarray(store.targets().column("split").to_pylist())
    m = margins(outputs.astype(np.float64), labels)  # (M, T)
    fit_m, held = slice(0, len(masks) - heldout), slice(len(masks) - heldout, None)
    out = {}
    for name, cols in (("test", split == "test"), ("train", split == "train")):
        dm = fit_datamodels(masks[fit_m], m[fit_m][:, cols], lam=lam, estimator=estimator)
        out[f"lds_{name}"] = float(lds(dm, masks[held], m[held][:, cols]))
    return out
