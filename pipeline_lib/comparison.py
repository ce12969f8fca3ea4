"""Method comparison against oracle ensembles (evaluation.md; the DMM paper's benchmark).

N original models (different seeds) are each unlearned by every method; N oracles are
retrained on R. Per method the comparison reports:

- KLoM (:mod:`pipeline_lib.evaluation.klom`) of the N unlearned models' margins against the N oracles'
  margins, P95 / P99 / mean on the forget, retain and validation (test) points, beside the
  oracle-vs-oracle noise floor;
- UA, RA, TA, MIA-efficacy and loss-MIA AUC (mean ± std over the N unlearned models) and the
  Avg. Gap of each unlearned model to the oracles' mean metrics, averaged;
- the unlearning time ÷ the time of retraining one model.

The work per (original, method) is :func:`unlearn_one` — pure, so the flow can run it as a
Ray task; :func:`summarise` turns the results into rows; :func:`write_tables` and
:func:`plot_klom` write the Markdown/CSV table and the KLoM distribution plot.

This module sits above the library's packages rather than in ``evaluation/``: it composes
the config, the method registry, the image models and modality (Fisher statistics) with the
metrics, and the methods themselves use ``evaluation`` (``svd_projection`` scores with
``accuracy``), so placing it there would make the packages import each other.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_lib.attribution.datamodels import margins as margins_of
from pipeline_lib.attribution.matching import MatchTargets
from pipeline_lib.config import FisherConfig, ModelConfig, TrainConfig, UnlearnConfig
from pipeline_lib.evaluation.klom import klom_scores, noise_floor, summarize_splits
from pipeline_lib.evaluation.metrics import GAP_METRICS, metrics_from_logits
from pipeline_lib.io import atomic_path
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.models.image import build_model
from pipeline_lib.training.fit import predict_logits

SPLITS = ("forget", "retain", "validation")
METRICS = ("UA", "RA", "TA", "MIA_efficacy", "loss_MIA_AUC")


@dataclass(frozen=True)
class Problem:
    """One request's data, laid out like the attribution stores' targets.

    X (T, *shape), y (T,) are the target points; ``forget``, ``retain`` and ``validation``
    are index arrays into T (validation = the test split)."""

    X: torch.Tensor
    y: torch.Tensor
    forget: np.ndarray
    retain: np.ndarray
    validation: np.ndarray
    n_classes: int
    #: Sample id of every target (T,); keys ``true_sampled`` Fisher labels as the pipeline does.
    ids: np.ndarray | None = None

    def split_indices(self) -> dict[str, np.ndarray]:
        return {"forget": self.forget, "retain": self.retain, "validation": self.validation}


def metrics_of_logits(
    logits: torch.Tensor, problem: Problem, c: float, folds: int, seed: int
) -> dict[str, float]:
    """UA/RA/TA/MIA metrics from logits on all T targets."""
    f, r, v = (
        torch.from_numpy(problem.forget),
        torch.from_numpy(problem.retain),
        torch.from_numpy(problem.validation),
    )
    return metrics_from_logits(
        logits[f], problem.y[f], logits[r], problem.y[r], logits[v], problem.y[v], c, folds, seed
    )


def unlearn_one(
    method_name: str,
    state: Mapping[str, torch.Tensor],
    problem: Problem,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    unlearn_cfg: UnlearnConfig,
    fisher_cfg: FisherConfig,
    seed: int,
    match: MatchTargets | None = None,
    mia: tuple[float, int, int] = (3.0, 5, 0),
) -> dict[str, Any]:
    """Unlearn one original (``state``) with ``method_name``; return its margins on all T
    targets (float32), metrics, seconds (method + Fisher statistics + target computation)
    and the method's info. ``match`` carries precomputed targets for output matching."""
    method = get_method(method_name)
    shape = tuple(problem.X.shape[1:])
    model = build_model(model_cfg, shape, problem.n_classes, seed=0)
    model.load_state_dict(dict(state))
    model.eval()
    f, r = torch.from_numpy(problem.forget), torch.from_numpy(problem.retain)
    t0 = time.perf_counter()
    fisher_f = fisher_r = None
    if method.needs_fisher:
        from pipeline_lib.modalities.image import fisher_pair

        ids = problem.ids
        fisher_f, fisher_r, _ = fisher_pair(
            model,
            (problem.X[f], problem.y[f]),
            (problem.X[r], problem.y[r]),
            fisher_cfg,
            forget_ids=None if ids is None else list(ids[problem.forget]),
            retain_ids=None if ids is None else list(ids[problem.retain]),
        )
    if method.needs_targets and (match is None or match.source != method.needs_targets):
        raise ValueError(f"method {method_name} needs matching targets from {method.needs_targets}")
    inputs = UnlearnInputs(
        problem.X[f],
        problem.y[f],
        problem.X[r],
        problem.y[r],
        model_factory=lambda s: build_model(model_cfg, shape, problem.n_classes, s),
        train=train_cfg,
        fisher_forget=fisher_f,
        fisher_retain=fisher_r,
        match=match,
    )
    params = unlearn_cfg.method_params(method_name)
    unlearned, info = method.fn(copy.deepcopy(model), inputs, params, seed)
    seconds = time.perf_counter() - t0 + (match.seconds if match is not None else 0.0)
    logits = predict_logits(unlearned, problem.X)
    return {
        "method": method_name,
        "seconds": seconds,
        "info": info,
        "margins": margins_of(logits, problem.y.numpy()).astype(np.float32),
        "metrics": metrics_of_logits(logits, problem, *mia),
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    oracle_margins: np.ndarray,
    oracle_metrics: Sequence[Mapping[str, float]],
    problem: Problem,
    retrain_seconds: float,
    floor_seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Rows of the comparison table (one per method, in the given order), the noise floor
    per split, and each method's per-point KLoM scores (for the plots).

    ``results[method]``: the :func:`unlearn_one` outputs of its N unlearned models;
    ``oracle_margins`` (N_o, T) and ``oracle_metrics`` of the oracles."""
    splits = problem.split_indices()
    floor = noise_floor(oracle_margins, splits, seed=floor_seed)
    oracle_mean = {k: float(np.mean([m[k] for m in oracle_metrics])) for k in METRICS}
    rows, scores = [], {}
    for name, runs in results.items():
        um = np.stack([r["margins"] for r in runs])
        s = klom_scores(um, oracle_margins)
        scores[name] = s
        klom = summarize_splits(s, splits)
        row: dict[str, Any] = {"method": name, "n_models": len(runs)}
        for split in SPLITS:
            for stat in ("p95", "p99", "mean"):
                row[f"klom_{split}_{stat}"] = klom[split][stat]
            idx = splits[split]
            # |mean unlearned margin − mean oracle margin| per point, averaged: a coarser,
            # less noisy companion of KLoM at small N
            row[f"margin_gap_{split}"] = float(
                np.abs(um[:, idx].mean(0) - oracle_margins[:, idx].mean(0)).mean()
            )
        for k in METRICS:
            row[k], row[f"{k}_std"] = _mean_std([r["metrics"][k] for r in runs])
        gaps = [
            float(np.mean([abs(r["metrics"][k] - oracle_mean[k]) for k in GAP_METRICS]))
            for r in runs
        ]
        row["avg_gap"], row["avg_gap_std"] = _mean_std(gaps)
        row["seconds"], row["seconds_std"] = _mean_std([r["seconds"] for r in runs])
        row["time_over_retrain"] = (
            row["seconds"] / retrain_seconds if retrain_seconds > 0 else float("nan")
        )
        rows.append(row)
    oracle_row: dict[str, Any] = {"method": "oracle (retrain)", "n_models": len(oracle_metrics)}
    from pipeline_lib.evaluation.klom import oracle_halves

    a, b = oracle_halves(oracle_margins.shape[0], floor_seed)
    for split in SPLITS:
        for stat in ("p95", "p99", "mean"):
            oracle_row[f"klom_{split}_{stat}"] = floor[split][stat]
        idx = splits[split]
        oracle_row[f"margin_gap_{split}"] = float(
            np.abs(oracle_margins[a][:, idx].mean(0) - oracle_margins[b][:, idx].mean(0)).mean()
        )
    for k in METRICS:
        oracle_row[k], oracle_row[f"{k}_std"] = _mean_std([m[k] for m in oracle_metrics])
    oracle_row["avg_gap"], oracle_row["avg_gap_std"] = 0.0, 0.0
    oracle_row["seconds"], oracle_row["seconds_std"] = retrain_seconds, 0.0
    oracle_row["time_over_retrain"] = 1.0
    rows.append(oracle_row)
    return rows, floor, scores


TABLE_COLUMNS = (
    ("method", "method", "{}"),
    ("N", "n_models", "{}"),
    ("KLoM forget P95", "klom_forget_p95", "{:.3f}"),
    ("KLoM forget mean", "klom_forget_mean", "{:.3f}"),
    ("KLoM retain P95", "klom_retain_p95", "{:.3f}"),
    ("KLoM val P95", "klom_validation_p95", "{:.3f}"),
    ("UA", "UA", "{:.2f}"),
    ("RA", "RA", "{:.2f}"),
    ("TA", "TA", "{:.2f}"),
    ("MIA-eff", "MIA_efficacy", "{:.2f}"),
    ("Avg. Gap", "avg_gap", "{:.2f}"),
    ("time ÷ retrain", "time_over_retrain", "{:.4f}"),
)


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """The comparison table in Markdown; the oracle row's KLoM cells are the noise floor."""
    head = "| " + " | ".join(c for c, _, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "---|" * len(TABLE_COLUMNS)
    body = ["| " + " | ".join(fmt.format(r[k]) for _, k, fmt in TABLE_COLUMNS) + " |" for r in rows]
    note = (
        "\nKLoM of the oracle row: the oracle-vs-oracle noise floor (two disjoint halves of the "
        "oracles). Accuracies, MIA-efficacy and Avg. Gap: means over the N models; Avg. Gap "
        "against the oracles' mean metrics."
    )
    return "\n".join(([f"### {title}", ""] if title else []) + [head, sep, *body, note]) + "\n"


def csv_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Every field of every row (means, standard deviations, all KLoM statistics) as CSV."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def write_tables(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str = ""
) -> dict[str, str]:
    """comparison.md and comparison.csv in ``out_dir``, each written atomically."""
    out = {}
    for name, text in (
        ("comparison.md", markdown_table(rows, title)),
        ("comparison.csv", csv_table(rows)),
    ):
        path = Path(out_dir) / name
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        out[name] = str(path)
    return out


def plot_klom(
    scores: Mapping[str, np.ndarray],
    floor_scores: np.ndarray,
    problem: Problem,
    path: str | Path,
    title: str = "",
) -> None:
    """KLoM distribution per split (one panel each) for every method, with the noise floor's
    distribution, as box plots on a symlog axis; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*scores, "noise floor"]
    fig, axes = plt.subplots(
        1, len(SPLITS), figsize=(5 * len(SPLITS), 0.45 * len(names) + 2), sharey=True
    )
    for ax, split in zip(axes, SPLITS, strict=True):
        idx = problem.split_indices()[split]
        data = [np.asarray(scores[n])[idx] for n in scores] + [np.asarray(floor_scores)[idx]]
        ax.boxplot(data, vert=False, whis=(5, 95), showfliers=False)
        p95 = [np.percentile(d, 95) for d in data]
        ax.scatter(p95, np.arange(1, len(data) + 1), marker="|", s=200, color="red", label="P95")
        ax.set_yticks(np.arange(1, len(names) + 1), names)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_title(f"{split} ({len(idx)} points)")
        ax.set_xlabel("KLoM (KL unlearned ‖ oracle)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "KLoM per split")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def floor_scores(oracle_margins: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per-point oracle-vs-oracle KLoM (the noise floor's distribution, for the plot)."""
    from pipeline_lib.evaluation.klom import oracle_halves

    a, b = oracle_halves(oracle_margins.shape[0], seed)
    return klom_scores(oracle_margins[a], oracle_margins[b])
