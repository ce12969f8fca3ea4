"""The text modality: steps of the language-model pipeline as plain functions (the Prefect
tasks in ``tasks/compute.py`` wrap them): train the original and the oracle, unlearn, evaluate.

Evaluation (per model: original, oracle, unlearned), each also as a gap to the oracle:

- perplexity on the forget, retain and held-out documents (exp of the mean token NLL);
- loss-MIA AUC: per-document mean token loss, forget (1) vs held-out (0), cross-validated
  logistic regression (:func:`pipeline_lib.evaluation.metrics.loss_mia_auc`); 0.5 = indistinguishable;
- verbatim memorisation: the rate of exact greedy continuations of forget-document prefixes
  (and the mean fraction of matching tokens).

``avg_gap`` = mean of |relative gap| of the three perplexities and |gap| of the MIA AUC and
the memorisation rate (all unitless). The report has the image pipeline's shape
(``models``/``cost``/extras), written as report.json and report.png.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline_lib.config.text import LMModelConfig, LMParams, LMTrainConfig, LMUnlearnConfig
from pipeline_lib.data.requests import Manifests, load_manifests
from pipeline_lib.data.text import PreparedCorpus, load_corpus
from pipeline_lib.evaluation.metrics import cost, format_table, loss_mia_auc
from pipeline_lib.io import atomic_path, check_same_data, load_into, save_model, write_json
from pipeline_lib.methods.text import LMUnlearnInputs, get_lm_method
from pipeline_lib.models import lm

log = logging.getLogger(__name__)

LM_GAP_METRICS = ("ppl_forget", "ppl_retain", "ppl_heldout", "loss_MIA_AUC", "memorization_rate")
LM_SUMMARY_COLUMNS = (
    "ppl_forget",
    "ppl_retain",
    "ppl_heldout",
    "loss_MIA_AUC",
    "memorization_rate",
    "ppl_forget_rel_gap",
    "avg_gap",
)


@dataclass(frozen=True)
class TextSplits:
    corpus: PreparedCorpus
    manifests: Manifests
    forget: list[str]
    retain: list[str]
    heldout: list[str]
    #: held-out documents of the groups the forget documents belong to
    heldout_group: list[str]


def load_text_splits(prepared_dir: str | Path, manifests_dir: str | Path) -> TextSplits:
    corpus = load_corpus(prepared_dir)
    man = load_manifests(manifests_dir)
    check_same_data(man.summary, corpus.content_hash, manifests_dir, prepared_dir)
    group_of = dict(zip(corpus.ids, corpus.groups, strict=True))
    fgroups = {group_of[d] for d in man.forget_ids}
    test = corpus.split_ids("test")
    return TextSplits(
        corpus,
        man,
        corpus.texts_of(man.forget_ids),
        corpus.texts_of(man.retain_ids),
        corpus.texts_of(test),
        corpus.texts_of([d for d in test if group_of[d] in fgroups]),
    )


def model_factory(cfg: LMModelConfig):
    return lambda seed: lm.build_lm(cfg, seed)


def load_lm(path: str | Path, cfg: LMModelConfig) -> nn.Module:
    return load_into(lm.build_lm(cfg, 0), path)


def save_lm(
    model: nn.Module, out_dir: str | Path, role: str, meta: dict[str, str]
) -> tuple[str, str]:
    return save_model(model, out_dir, f"lm-{role}", meta)


def lm_train_step(
    prepared_dir: str | Path,
    manifests_dir: str | Path | None,
    role: str,
    model_cfg: LMModelConfig,
    train_cfg: LMTrainConfig,
    seed: int,
    out_dir: str | Path,
) -> dict[str, Any]:
    """The original (all training documents, ``manifests_dir`` None) or the oracle (retain
    documents only)."""
    if manifests_dir is None:
        corpus = load_corpus(prepared_dir)
        texts = corpus.texts_of(np.sort(corpus.split_ids("train")))
    else:
        texts = load_text_splits(prepared_dir, manifests_dir).retain
    model = lm.build_lm(model_cfg, seed)
    win = lm.make_windows(texts, model_cfg.n_positions, lm.tokenizer_for(model_cfg))
    stats = lm.train_lm(model, win, train_cfg, seed)
    path, digest = save_lm(model, out_dir, role, {"seed": str(seed)})
    log.info(
        "trained LM %s on %d documents in %.1fs -> %s", role, len(texts), stats["seconds"], path
    )
    return {
        "path": path,
        "digest": digest,
        "seconds": stats["seconds"],
        "n_train": len(texts),
        "seed": seed,
        "final_train_loss": stats["final_train_loss"],
    }


def unlearn_inputs(
    splits: TextSplits,
    model_cfg: LMModelConfig,
    train_cfg: LMTrainConfig,
    oracle: nn.Module | None,
    eval_bs: int,
) -> LMUnlearnInputs:
    L, tok = model_cfg.n_positions, lm.tokenizer_for(model_cfg)
    return LMUnlearnInputs(
        lm.make_windows(splits.forget, L, tok),
        lm.make_windows(splits.retain, L, tok),
        lm.make_windows(splits.heldout, L, tok),
        lm.make_windows(splits.heldout_group, L, tok) if splits.heldout_group else None,
        model_factory(model_cfg),
        train_cfg,
        oracle,
        eval_bs,
    )


def lm_unlearn_step(
    splits: TextSplits,
    weights_path: str,
    model_cfg: LMModelConfig,
    train_cfg: LMTrainConfig,
    unlearn_cfg: LMUnlearnConfig,
    out_dir: str | Path,
    oracle_path: str | None = None,
    eval_batch_size: int = 32,
) -> dict[str, Any]:
    method = get_lm_method(unlearn_cfg.method)
    original = load_lm(weights_path, model_cfg)
    oracle = load_lm(oracle_path, model_cfg) if oracle_path else None
    params = unlearn_cfg.method_params()
    if method.needs_oracle(params) and oracle is None:
        raise ValueError(f"{method.name} with target 'oracle' needs the oracle weights")
    inputs = unlearn_inputs(splits, model_cfg, train_cfg, oracle, eval_batch_size)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    t0 = time.perf_counter()
    model, info = method.fn(copy.deepcopy(original), inputs, params, unlearn_cfg.seed)
    seconds = time.perf_counter() - t0
    path, digest = save_lm(model, out_dir, f"unlearned-{method.name}", {"method": method.name})
    log.info("unlearned LM with %s in %.2fs -> %s", method.name, seconds, path)
    return {"path": path, "digest": digest, "seconds": seconds, "info": info, "method": method.name}


# --------------------------------------------------------------------------- evaluation


def lm_metrics(model: nn.Module, splits: TextSplits, params: LMParams) -> dict[str, float]:
    ev, L, tok = params.evaluate, params.lm.n_positions, lm.tokenizer_for(params.lm)
    out: dict[str, float] = {}
    per_doc: dict[str, np.ndarray] = {}
    for name, texts in (
        ("forget", splits.forget),
        ("retain", splits.retain),
        ("heldout", splits.heldout),
    ):
        s, c = lm.doc_nll(model, lm.make_windows(texts, L, tok), ev.batch_size)
        out[f"ppl_{name}"] = lm.perplexity(s, c)
        out[f"loss_{name}"] = float(s.sum() / max(c.sum(), 1.0))
        per_doc[name] = s / np.maximum(c, 1.0)
    out["loss_MIA_AUC"] = loss_mia_auc(per_doc["forget"], per_doc["heldout"], ev.mia_folds, ev.seed)
    if ev.influence != "none":
        out.update(influence_metrics(model, splits, params))
    out.update(
        lm.memorisation(
            model,
            splits.forget,
            ev.prefix_tokens,
            ev.continuation_tokens,
            ev.prefixes_per_doc,
            ev.batch_size,
            tok,
        )
    )
    return out


def influence_metrics(model: nn.Module, splits: TextSplits, params: LMParams) -> dict[str, float]:
    """Mean (and mean absolute) influence score of the forget documents on the first window
    of ``influence_prompts`` held-out documents (:mod:`pipeline_lib.evaluation.influence`)."""
    from pipeline_lib.evaluation.influence import influence_scores

    ev, L, tok = params.evaluate, params.lm.n_positions, lm.tokenizer_for(params.lm)
    prompts = lm.make_windows(splits.heldout[: ev.influence_prompts], L, tok)
    first = torch.ones(len(prompts), dtype=torch.bool)
    first[1:] = prompts.doc[1:] != prompts.doc[:-1]
    prompts = lm.Windows(
        prompts.inputs[first], prompts.labels[first], prompts.doc[first], prompts.n_docs
    )
    hess = None
    if ev.influence == "hvp":
        train = lm.make_windows(splits.forget + splits.retain, L, tok)
        gen = torch.Generator().manual_seed(ev.seed)
        rows = torch.randperm(len(train), generator=gen)[: ev.influence_hessian_windows]
        hess = lm.Windows(
            train.inputs[rows], train.labels[rows], torch.zeros(len(rows), dtype=torch.long), 1
        )
    res = influence_scores(
        model,
        lm.make_windows(splits.forget, L, tok),
        prompts,
        hess,
        ev.influence,
        ev.influence_parameters,
        ev.influence_damping,
        ev.influence_cg_steps,
    )
    scores = np.asarray(res["scores"])
    return {
        "influence_mean": float(scores.mean()),
        "influence_abs_mean": float(np.abs(scores).mean()),
        "influence_cg_residual": float(res["cg_residual"]),
        INFLUENCE_SCORES: scores.tolist(),
    }


#: Per-forget-document influence scores in :func:`lm_metrics` (a list, not a metric): the
#: evaluation moves them into the report's ``influence`` block.
INFLUENCE_SCORES = "influence_scores"


def lm_gaps(m: Mapping[str, float], oracle: Mapping[str, float]) -> dict[str, float]:
    gaps: dict[str, float] = {}
    for k in LM_GAP_METRICS:
        gaps[f"{k}_gap"] = m[k] - oracle[k]
        if k.startswith("ppl_"):
            gaps[f"{k}_rel_gap"] = (m[k] - oracle[k]) / oracle[k]
    parts = [abs(gaps[f"{k}_rel_gap"]) for k in LM_GAP_METRICS if k.startswith("ppl_")]
    parts += [abs(gaps[f"{k}_gap"]) for k in LM_GAP_METRICS if not k.startswith("ppl_")]
    gaps["avg_gap"] = float(np.nanmean(parts))
    return gaps


def build_lm_report(
    models: Mapping[str, Mapping[str, float]],
    unlearn_seconds: float,
    retrain_seconds: float,
    extra: Mapping[str, object] | None = None,
) -> dict:
    oracle = models.get("oracle")
    table = {name: {**m, **(lm_gaps(m, oracle) if oracle else {})} for name, m in models.items()}
    if "original" in table:
        base = table["original"]["ppl_heldout"]
        for m in table.values():
            m["ppl_heldout_change"] = (m["ppl_heldout"] - base) / base
    return {
        "kind": "lm",
        "models": table,
        "cost": cost(unlearn_seconds, retrain_seconds),
        **(dict(extra) if extra else {}),
    }


def format_lm_table(report: Mapping) -> str:
    return format_table(report, LM_SUMMARY_COLUMNS, width=20, digits=4)


def plot_lm_report(report: Mapping, path: str | Path) -> None:
    """Grouped bars per metric for every model (the image report's layout): left panel the
    perplexities, right panel MIA AUC, memorisation rate and Avg. Gap; values on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    panels = (
        ("perplexity", ["ppl_forget", "ppl_retain", "ppl_heldout"]),
        ("privacy / memorisation / gap", ["loss_MIA_AUC", "memorization_rate", "avg_gap"]),
    )
    influence = report.get("influence")
    n_panels = 3 if influence else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4))
    width = 0.8 / len(names)
    for ax, (ylabel, metrics) in zip(axes[:2], panels, strict=True):
        x = np.arange(len(metrics))
        values = []
        for i, name in enumerate(names):
            vals = [float(report["models"][name].get(m, float("nan"))) for m in metrics]
            values += [v for v in vals if np.isfinite(v)]
            bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(x, metrics)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0.0, max(values + [1.0]) * 1.15)
    axes[0].legend(loc="upper left", fontsize=8)
    if influence:
        ax = axes[2]
        for name, scores in influence["scores"].items():
            ax.plot(np.arange(len(scores)), scores, marker="o", ms=3, lw=0.8, label=name)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel(f"forget document (of {len(influence['doc_ids'])})")
        ax.set_ylabel(f"influence on held-out prompts ({influence['method']})")
        ax.legend(fontsize=8)
    fig.suptitle(str(report.get("title", "LM unlearning evaluation")))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def lm_evaluate_step(
    splits: TextSplits,
    params: LMParams,
    weights: dict[str, str],
    unlearn_seconds: float,
    retrain_seconds: float,
    report_dir: str | Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    metrics = {
        name: lm_metrics(load_lm(path, params.lm), splits, params) for name, path in weights.items()
    }
    scores = {name: m.pop(INFLUENCE_SCORES) for name, m in metrics.items() if INFLUENCE_SCORES in m}
    report = build_lm_report(metrics, unlearn_seconds, retrain_seconds, extra)
    if scores:  # per forget document, before (original) and after unlearning, and the oracle
        report["influence"] = {
            "method": params.evaluate.influence,
            "doc_ids": [str(d) for d in splits.manifests.forget_ids],
            "scores": scores,
        }
    report_dir = Path(report_dir)
    write_json(report_dir / "report.json", report)
    plot_lm_report(report, report_dir / "report.png")
    return report


# --------------------------------------------------------------------------- the plug-in


def _load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> LMParams:
    from pipeline_lib.config.text import load_lm_params

    return load_lm_params(path, overrides)


def _unlearn_kwargs(extras: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """``extras``: ``oracle`` (its training result) when the calibration targets its loss."""
    oracle = extras.get("oracle")
    return {
        "oracle_path": oracle["path"] if oracle else None,
        "eval_batch_size": sections["evaluate"]["batch_size"],
    }


def _method_needs(method: Any, params: LMParams) -> frozenset[str]:
    return frozenset({"oracle"} if method.needs_oracle(params.unlearn.method_params()) else ())


def _extract(request: Any, prepared_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    from pipeline_lib.text_stages import extract_docs

    return extract_docs(request, prepared_dir)


def _lineage_table(prepared_dir: str) -> tuple[Any, str, str, str]:
    import pandas as pd

    corpus = load_corpus(prepared_dir)
    table = pd.DataFrame({"doc_id": corpus.ids, "group": corpus.groups, "split": corpus.split})
    return table, corpus.meta["dataset"], corpus.content_hash, "doc_id"


def _summary_line(report: Any) -> str:
    u = report["models"]["unlearned"]
    return (
        f"forget ppl {u['ppl_forget']:.3f} "
        f"(oracle gap {100 * u.get('ppl_forget_rel_gap', float('nan')):+.1f}%), "
        f"held-out ppl change {100 * u['ppl_heldout_change']:+.1f}%, "
        f"unlearn/retrain time {report['cost']['unlearn_over_retrain']:.4f}"
    )


def _modality() -> Any:
    from pipeline_lib.data.text import MANIFESTS_DIR, PREPARED_DIR
    from pipeline_lib.modalities import Modality

    return Modality(
        name="text",
        tag="lm",
        params_file="params-lm.yaml",
        dvc_file="lm/dvc.yaml",
        lock_file="lm/dvc.lock",
        data_sections=("text",),
        model_section="lm",
        load_params=_load_params,
        prepared_out=lambda p: PREPARED_DIR,
        manifests_out=lambda p: MANIFESTS_DIR,
        get_method=get_lm_method,
        method_needs=_method_needs,
        extract=_extract,
        configs=(LMModelConfig, LMTrainConfig, LMUnlearnConfig),
        load_splits=load_text_splits,
        train_step=lm_train_step,
        unlearn_step=lm_unlearn_step,
        unlearn_kwargs=_unlearn_kwargs,
        evaluate_step=lm_evaluate_step,
        lineage_table=_lineage_table,
        format_table=format_lm_table,
        summary_columns=LM_SUMMARY_COLUMNS,
        digits=4,
        summary_line=_summary_line,
        unlearn_reads=("evaluate",),
        stage_module="pipeline_lib.text_stages",
    )


MODALITY = _modality()
