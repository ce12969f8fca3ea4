"""The image modality: pipeline steps as plain functions: paths and config in, files and
metric dicts out.

Each Prefect task in ``tasks/`` is a thin wrapper around one of these (load → compute → save);
keeping them here means the whole pipeline is testable without any orchestrator.
Every file is written atomically and named by its content digest, so a re-run never sees a
half-written artifact and two runs never overwrite each other's weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.attribution.matching import (
    MatchTargets,
    datamodel_targets,
    matching_retain_rows,
    oracle_targets,
)
from pipeline_lib.attribution.store import AttributionStore
from pipeline_lib.config import (
    AttributionConfig,
    FisherConfig,
    ModelConfig,
    Params,
    TrainConfig,
    UnlearnConfig,
)
from pipeline_lib.data.images import Prepared, load_prepared
from pipeline_lib.data.requests import Manifests, load_manifests
from pipeline_lib.evaluation.metrics import (
    EvalSplits,
    build_report,
    evaluate_model,
    format_table,
    plot_report,
)
from pipeline_lib.io import (
    check_same_data,
    code_version,
    load_into,
    load_weights,
    save_model,
    write_json,
)
from pipeline_lib.methods import Method, UnlearnInputs, get_method
from pipeline_lib.methods.matching import datamodel_settings
from pipeline_lib.methods.mnemonic import CodeMixer, mnemonic_codes
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.ensemble import train_step_flops
from pipeline_lib.training.fit import (
    FitSettings,
    fit,
    predict_logits,
    resolve_device,
    threads_for,
    torch_threads,
)

log = logging.getLogger(__name__)

#: (moved to pipeline_lib.io; kept importable here for callers of the old path)
code_version = code_version


@dataclass(frozen=True)
class Splits:
    """Tensors of one request: X (N, *shape) float32, y (N,) int64."""

    data: Prepared
    manifests: Manifests
    forget: tuple[torch.Tensor, torch.Tensor]
    retain: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def eval_splits(self) -> EvalSplits:
        return EvalSplits(*self.forget, *self.retain, *self.test)


def load_splits(prepared_dir: str | Path, manifests_dir: str | Path) -> Splits:
    data = load_prepared(prepared_dir)
    man = load_manifests(manifests_dir)
    check_same_data(man.summary, data.content_hash, manifests_dir, prepared_dir)

    def tensors(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = data.subset(ids)
        return torch.from_numpy(X), torch.from_numpy(y)

    return Splits(
        data,
        man,
        tensors(man.forget_ids),
        tensors(man.retain_ids),
        tensors(data.split_ids("test")),
    )


def model_factory(model_cfg: ModelConfig, data: Prepared):
    return lambda seed: build_model(model_cfg, data.shape, data.n_classes, seed)


def load_model(weights_path: str | Path, model_cfg: ModelConfig, data: Prepared) -> nn.Module:
    return load_into(build_model(model_cfg, data.shape, data.n_classes, seed=0), weights_path)


def model_threads(train_cfg: TrainConfig, model_cfg: ModelConfig, data: Prepared):
    """``train.threads`` resolved for this model on this data (auto: one thread for a tiny
    step), as a context manager around training, unlearning and the request's statistics."""
    flops = train_step_flops(model_cfg, data.shape, data.n_classes, train_cfg.batch_size)
    return torch_threads(threads_for(train_cfg, flops))


def train_step(
    prepared_dir: str | Path,
    manifests_dir: str | Path | None,
    role: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    seed: int,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Train a fresh model: on the whole training split when ``manifests_dir`` is None (the
    original model, independent of any request), else on the request's retain set (the
    retrain-from-scratch oracle). Returns path, digest, seconds, n_train, seed."""
    if manifests_dir is None:
        data = load_prepared(prepared_dir)
        Xn, yn = data.subset(np.sort(data.split_ids("train")))
        X, y = torch.from_numpy(Xn), torch.from_numpy(yn)
    else:
        splits = load_splits(prepared_dir, manifests_dir)
        data = splits.data
        X, y = splits.retain
    device = resolve_device(train_cfg.device)
    model = model_factory(model_cfg, data)(seed)
    settings = FitSettings(
        train_cfg.epochs,
        train_cfg.batch_size,
        train_cfg.lr,
        train_cfg.optimizer,
        train_cfg.weight_decay,
        train_cfg.momentum,
    )
    mixer = None
    if train_cfg.mnemonic_t_mix > 0:
        codes = mnemonic_codes(data.shape, data.n_classes, train_cfg.mnemonic_seed)
        mixer = CodeMixer(codes, train_cfg.mnemonic_t_mix, seed)
    with model_threads(train_cfg, model_cfg, data):
        t0 = time.perf_counter()
        fit(model, X, y, settings, seed, device=device, batch_transform=mixer)
        seconds = time.perf_counter() - t0
    path, digest = save_model(model.cpu(), out_dir, role, {"seed": str(seed)})
    log.info("trained %s on %d samples in %.2fs -> %s", role, len(X), seconds, path)
    return {"path": path, "digest": digest, "seconds": seconds, "n_train": len(X), "seed": seed}


def fisher_pair(
    model: nn.Module,
    forget: tuple[torch.Tensor, torch.Tensor],
    retain: tuple[torch.Tensor, torch.Tensor],
    cfg: FisherConfig,
    forget_ids: Sequence[str] | None = None,
    retain_ids: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Fisher diagonals I_F and I_R (R subsampled to ``cfg.max_retain``, seeded) and |R| used.
    With sample ids, ``true_sampled`` labels are keyed by id, as in the pipeline and
    ``unlearn stats``; without, by position."""
    rX, ry = retain
    if cfg.max_retain is not None and cfg.max_retain < len(rX):
        rows = np.sort(
            np.random.default_rng(cfg.seed).choice(len(rX), cfg.max_retain, replace=False)
        )
        rX, ry = rX[torch.from_numpy(rows)], ry[torch.from_numpy(rows)]
        if retain_ids is not None:
            retain_ids = [retain_ids[i] for i in rows]
    opts = {"kind": cfg.kind, "batch_size": cfg.batch_size, "seed": cfg.seed}
    fisher_f = fisher_diagonal(
        model, *forget, **opts, sample_ids=None if forget_ids is None else list(forget_ids)
    )
    fisher_r = fisher_diagonal(
        model, rX, ry, **opts, sample_ids=None if retain_ids is None else list(retain_ids)
    )
    return fisher_f, fisher_r, len(rX)


def fisher_split_ids(manifests: Manifests, split: str, cfg: FisherConfig) -> np.ndarray:
    """Sample ids whose Fisher diagonal is I_F (``forget``) or I_R (``retain``: a seeded
    subsample of ``cfg.max_retain`` ids when set), in manifest order."""
    if split not in ("forget", "retain"):
        raise ValueError(f"split {split!r} unknown; valid: forget, retain")
    ids = manifests.forget_ids if split == "forget" else manifests.retain_ids
    if split == "retain" and cfg.max_retain is not None and cfg.max_retain < len(ids):
        rows = np.sort(
            np.random.default_rng(cfg.seed).choice(len(ids), cfg.max_retain, replace=False)
        )
        ids = ids[rows]
    return ids


def fisher_config(cfg: FisherConfig, split: str, n: int, **extra: Any) -> dict[str, Any]:
    """What a Fisher statistics file records about how it was made."""
    return {
        "statistic": "fisher_diagonal",
        "split": split,
        "kind": cfg.kind,
        "seed": cfg.seed,
        "max_retain": cfg.max_retain,
        "n": n,
        **extra,
    }


def matching_points(splits: Splits, multiple: float, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Sample ids and inputs of the matching points: all of F, then
    ``multiple``·|F| seeded retain points (:func:`pipeline_lib.attribution.matching.matching_retain_rows`)."""
    man = splits.manifests
    rows = matching_retain_rows(len(man.forget_ids), len(man.retain_ids), multiple, seed)
    ids = np.concatenate([man.forget_ids, man.retain_ids[rows]])
    X = torch.cat([splits.forget[0], splits.retain[0][torch.from_numpy(rows)]])
    return ids, X


def matching_targets(
    source: str,
    splits: Splits,
    full_logits: Any,
    ids: np.ndarray,
    X: torch.Tensor,
    store_root: str | Path,
    attribution: AttributionConfig,
    lam: float | None = None,
    anchor: bool = False,
    anchor_root: str | Path | None = None,
) -> MatchTargets:
    """Target logits of the matching points ``ids`` (forget ids first).

    ``source='datamodels'``: DM-Direct from the subset-model store at ``store_root`` —
    linear datamodels fitted on the store's logits at these points, f̂ = full_logits − Σ_F β.
    ``source='oracles'``: the mean logits of the oracle store's models at these points.
    ``full_logits`` (P, C): the model being unlearned, on X (only used for datamodels).
    The store's ridge factor is request-independent: computed once and cached in the store
    (like the subset models, not counted in this request's time). ``lam``: the ridge penalty
    (None: ``attribution.lam``); ``anchor``: see
    :func:`pipeline_lib.attribution.matching.full_model_anchor`; ``anchor_root``: a store of
    reference models trained on all of D whose mean logits at these points pin the anchor
    instead of ``full_logits`` (``unlearn.dmm.anchor_models``).
    """
    lam = attribution.lam if lam is None else lam
    store = AttributionStore.open(store_root)
    factor = None
    if source == "datamodels" and attribution.estimator == "ridge_dual":
        factor = store.ridge_factor(lam)
    t0 = time.perf_counter()
    n_forget = len(splits.manifests.forget_ids)
    # the flow verified every checksum when it ensured the store (train_store → check)
    masks, outputs = store.gather(store.columns_of(ids), verify=False)
    if source == "datamodels":
        if store.spec.kind != "subsets":
            raise ValueError(f"{store_root} is a {store.spec.kind} store; DMM needs subset models")
        train_ids = np.sort(splits.data.split_ids("train"))
        if len(train_ids) != store.spec.n_train:
            raise ValueError(
                f"{store_root} was trained on other data ({store.spec.n_train} points)"
            )
        forget_pos = np.searchsorted(train_ids, splits.manifests.forget_ids)
        pin = None
        if anchor and anchor_root is not None:
            ref = AttributionStore.open(anchor_root)
            if ref.spec.kind != "originals" or ref.spec.n_train != store.spec.n_train:
                raise ValueError(
                    f"{anchor_root} is not a store of models trained on these "
                    f"{store.spec.n_train} points (kind {ref.spec.kind}, N {ref.spec.n_train})"
                )
            _, ref_out = ref.gather(ref.columns_of(ids), verify=False)
            pin = ref_out.astype(np.float64).mean(axis=0)
        targets = datamodel_targets(
            masks,
            outputs,
            full_logits,
            forget_pos,
            lam,
            attribution.estimator,
            factor,
            anchor,
            pin,
        )
    elif source == "oracles":
        if store.spec.kind != "oracles":
            raise ValueError(
                f"{store_root} is a {store.spec.kind} store; oracle matching needs oracles"
            )
        targets = oracle_targets(outputs)
    else:
        raise ValueError(f"unknown target source {source!r}; valid: datamodels, oracles")
    return MatchTargets(
        X,
        torch.from_numpy(targets.astype(np.float32)),
        n_forget,
        source,
        time.perf_counter() - t0,
    )


def unlearn_inputs(
    splits: Splits,
    method: Method,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    fisher: dict[str, Any] | None,
    device: torch.device,
) -> UnlearnInputs:
    """What ``method`` may read. A method with ``needs_data=False`` gets zero-row forget and
    retain tensors: only the request's classes and (when the model was trained with them)
    the mnemonic codes reach it."""
    if method.needs_fisher and fisher is None:
        raise ValueError(f"method {method.name} needs Fisher statistics; run the fisher step first")
    data = splits.data
    request = splits.manifests.summary.get("request", {})
    forget_classes = tuple(int(c) for c in request.get("classes", ()))
    codes = None
    if train_cfg.mnemonic_t_mix > 0:
        codes = mnemonic_codes(data.shape, data.n_classes, train_cfg.mnemonic_seed)
    forget, retain = splits.forget, splits.retain
    if not method.needs_data:
        forget = retain = (torch.empty((0, *data.shape)), torch.empty(0, dtype=torch.int64))
    return UnlearnInputs(
        *forget,
        *retain,
        model_factory=model_factory(model_cfg, data),
        train=train_cfg,
        fisher_forget=load_weights(fisher["forget_path"]) if fisher else None,
        fisher_retain=load_weights(fisher["retain_path"]) if fisher else None,
        device=device,
        forget_classes=forget_classes,
        mnemonic_codes=codes,
    )


def unlearn_step(
    splits: Splits,
    weights_path: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    unlearn_cfg: UnlearnConfig,
    out_dir: str | Path,
    fisher: dict[str, Any] | None = None,
    store_root: str | Path | None = None,
    attribution: AttributionConfig | None = None,
    anchor_root: str | Path | None = None,
) -> dict[str, Any]:
    """Apply ``unlearn_cfg.method`` to the original model. Returns path, digest, seconds, info.

    Output-matching methods (dmm, oracle_matching) need ``store_root``: the subset-model or
    oracle store their targets come from; computing the targets counts as unlearning time.
    ``anchor_root``: dmm's reference store when ``unlearn.dmm.anchor_models`` > 0."""
    method = get_method(unlearn_cfg.method)
    device = resolve_device(train_cfg.device)
    original = load_model(weights_path, model_cfg, splits.data).to(device)
    match = None
    if method.needs_targets:
        if store_root is None:
            raise ValueError(
                f"method {method.name} needs an attribution store of {method.needs_targets}"
            )
        mp = unlearn_cfg.method_params()
        ids, X = matching_points(splits, mp.retain_multiple, unlearn_cfg.seed)
        t0 = time.perf_counter()
        full = predict_logits(original, X)
        attribution = attribution or AttributionConfig()
        lam, anchor = datamodel_settings(mp, attribution.lam)
        match = matching_targets(
            method.needs_targets,
            splits,
            full,
            ids,
            X,
            store_root,
            attribution,
            lam,
            anchor,
            anchor_root,
        )
        match = dataclasses.replace(match, seconds=time.perf_counter() - t0)
    inputs = unlearn_inputs(splits, method, model_cfg, train_cfg, fisher, device)
    inputs = dataclasses.replace(inputs, match=match)
    with model_threads(train_cfg, model_cfg, splits.data):  # as train_step: the same trainer
        t0 = time.perf_counter()
        model, info = method.fn(
            copy.deepcopy(original), inputs, unlearn_cfg.method_params(), unlearn_cfg.seed
        )
        seconds = time.perf_counter() - t0 + (match.seconds if match else 0.0)
    path, digest = save_model(
        model.cpu(), out_dir, f"unlearned-{method.name}", {"method": method.name}
    )
    log.info("unlearned with %s in %.2fs -> %s", method.name, seconds, path)
    return {"path": path, "digest": digest, "seconds": seconds, "info": info, "method": method.name}


def evaluate_step(
    splits: Splits,
    params: Params,
    weights: dict[str, str],
    unlearn_seconds: float,
    retrain_seconds: float,
    report_dir: str | Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the models named in ``weights`` (must include ``oracle``); write
    ``report.json`` and ``report.png`` into ``report_dir``. Returns the report."""
    ev = params.evaluate
    metrics = {
        name: evaluate_model(
            load_model(path, params.model, splits.data),
            splits.eval_splits(),
            ev.mia_svc_c,
            ev.mia_folds,
            ev.seed,
            ev.mia_seeds,
        )
        for name, path in weights.items()
    }
    report = build_report(metrics, unlearn_seconds, retrain_seconds, extra)
    report_dir = Path(report_dir)
    write_json(report_dir / "report.json", report)
    plot_report(report, report_dir / "report.png")
    log.debug("evaluation:\n%s", format_table(report))
    return report


# --------------------------------------------------------------------------- the plug-in


def _load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    from pipeline_lib.config import load_params

    return load_params(path, overrides)


def _unlearn_kwargs(extras: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """``extras``: ``fisher`` (files and digests of I_F, I_R) and ``store`` (root, masks
    digest and the ``attribution`` section of the attribution store, and ``anchor_root`` when
    dmm's anchor has reference models) when the method needs them."""
    from pipeline_lib.config import parse_section

    store = extras.get("store")
    return {
        "fisher": extras.get("fisher"),
        "store_root": store["root"] if store else None,
        "attribution": parse_section(AttributionConfig, store["attribution"]) if store else None,
        "anchor_root": store.get("anchor_root") if store else None,
    }


def _method_needs(method: Method, params: Params) -> frozenset[str]:
    needs = set()
    if method.needs_fisher:
        needs.add("fisher")
    if method.needs_targets:
        needs.add("store")
    return frozenset(needs)


def _extract(request: Any, prepared_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    from pipeline_lib.stages import extract_images

    return extract_images(request, prepared_dir)


def _lineage_table(prepared_dir: str) -> tuple[Any, str, str, str]:
    import pandas as pd

    prepared = load_prepared(prepared_dir)
    table = pd.DataFrame({"sample_id": prepared.ids, "split": prepared.split, "label": prepared.y})
    return table, prepared.meta["dataset"], prepared.content_hash, "sample_id"


def _summary_line(report: Any) -> str:
    return (
        f"unlearned Avg. Gap {report['models']['unlearned']['avg_gap']:.3f}, "
        f"unlearn/retrain time {report['cost']['unlearn_over_retrain']:.3f}"
    )


def _modality() -> Any:
    from pipeline_lib.evaluation.metrics import SUMMARY_COLUMNS
    from pipeline_lib.modalities import Modality

    return Modality(
        name="image",
        tag="image",
        params_file="params.yaml",
        dvc_file="dvc.yaml",
        lock_file="dvc.lock",
        data_sections=("data",),
        model_section="model",
        load_params=_load_params,
        prepared_out=lambda p: p.data.out_dir,
        manifests_out=lambda p: p.request.out_dir,
        get_method=get_method,
        method_needs=_method_needs,
        extract=_extract,
        configs=(ModelConfig, TrainConfig, UnlearnConfig),
        load_splits=load_splits,
        train_step=train_step,
        unlearn_step=unlearn_step,
        unlearn_kwargs=_unlearn_kwargs,
        evaluate_step=evaluate_step,
        lineage_table=_lineage_table,
        format_table=format_table,
        summary_columns=SUMMARY_COLUMNS,
        digits=3,
        summary_line=_summary_line,
    )


MODALITY = _modality()
