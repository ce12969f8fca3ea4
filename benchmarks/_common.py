"""Shared set-up of the many-model benchmarks: data and store specs (not a test helper)."""

from __future__ import annotations

import numpy as np

from pipeline_lib.attribution.store import StoreSpec
from pipeline_lib.config import DataConfig, Params, to_dict
from pipeline_lib.data.images import (
    assign_split,
    load_digits_source,
    load_fashion_mnist_source,
)


def load_split(name: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(train X, train y, target X, target y, target ids, target split) with the pipeline's
    split; targets are the training points, then the test points."""
    cfg = DataConfig(name=name, seed=seed)
    raw = load_digits_source(cfg) if name == "digits" else load_fashion_mnist_source(cfg)
    split = assign_split(raw, cfg)
    order = np.argsort(raw.ids, kind="stable")
    tr = order[split[order] == "train"]
    te = order[split[order] == "test"]
    tg = np.concatenate([tr, te])
    return raw.X[tr], raw.y[tr], raw.X[tg], raw.y[tg], raw.ids[tg], split[tg]


def spec_for(
    n_train: int,
    n_models: int,
    chunk_size: int,
    epochs: int,
    hidden=(128, 128),
    alpha: float = 0.5,
    seed: int = 0,
) -> StoreSpec:
    p = Params()
    train = to_dict(p.train)
    train["epochs"] = epochs
    train = {
        k: train[k] for k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "momentum")
    }
    return StoreSpec(
        kind="subsets",
        n_models=n_models,
        alpha=alpha,
        seed=seed,
        chunk_size=chunk_size,
        n_train=n_train,
        n_classes=10,
        data_hash=f"bench-{n_train}",
        model={"name": "mlp", "hidden": list(hidden), "channels": [16, 32]},
        train=train,
    )
