"""Method comparison against oracle ensembles (evaluation.md; the DMM paper's benchmark).

N original models (different seeds) are each unlearned by every method; N oracles are
retrained on R. Per method the comparison reports:

- KLoM (:mod:`pipeline_lib.evaluation.klom`) of the N unlearned models' margins against the N oracles'
  margins, P95 / P99 / mean on the forget, retain and validation (test) points, beside the
  oracle-vs-oracle noise floor;
- UA, RA, TA (mean ± std over the N unlearned models); MIA-efficacy and loss-MIA AUC over the
  N models × ``evaluate.mia_seeds`` seeded draws each (mean ± std, split into the spread
  between models and the seed noise); the Avg. Gap of each (model, seed) to the oracles' mean
  metrics at that seed, averaged, with its spread;
- U-LiRA and LiRA against the original at the forget points
  (:mod:`pipeline_lib.evaluation.ulira`), from the margins the comparison already has;
- the unlearning time ÷ the time of retraining one model.

KLoM's binning is ours or EasyDUB's (``evaluate.klom_binning``); the table names it.

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
from pipeline_lib.evaluation.metrics import (
    GAP_METRICS,
    SEEDED_METRICS,
    draw_spread,
    mean_std,
    metrics_from_logits,
)
from pipeline_lib.evaluation.ulira import ulira_auc
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
    logits: torch.Tensor, problem: Problem, c: float, folds: int, seed: int, n_seeds: int = 1
) -> dict[str, float]:
    """UA/RA/TA/MIA metrics from logits on all T targets (the MIAs as ``n_seeds`` draws)."""
    f, r, v = (
        torch.from_numpy(problem.forget),
        torch.from_numpy(problem.retain),
        torch.from_numpy(problem.validation),
    )
    return metrics_from_logits(
        logits[f],
        problem.y[f],
        logits[r],
        problem.y[r],
        logits[v],
        problem.y[v],
        c,
        folds,
        seed,
        n_seeds,
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
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Unlearn one original (``state``) with ``method_name``; return its margins on all T
    targets (float32), metrics, seconds (method + Fisher statistics + target computation)
    and the method's info. ``match`` carries precomputed targets for output matching.
    ``device``: where the method and its statistics compute (default CPU)."""
    device = device or torch.device("cpu")
    method = get_method(method_name)
    shape = tuple(problem.X.shape[1:])
    model = build_model(model_cfg, shape, problem.n_classes, seed=0)
    model.load_state_dict(dict(state))
    model.to(device).eval()
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
        device=device,
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
    return mean_std(values)


def _draws(metrics: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """(N, S) seeded draws of ``key`` over N models' metrics (S = 1 without draws)."""
    d = np.array([m.get(f"{key}_draws", [m[key]]) for m in metrics], dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"{key}: every model needs the same number of seeded draws")
    return d


def _put_spread(row: dict[str, Any], key: str, draws: np.ndarray) -> None:
    """``key`` (mean), ``key_std`` (over all N·S draws), ``key_model_std``, ``key_seed_std``."""
    s = draw_spread(draws)
    row[key], row[f"{key}_std"] = s["mean"], s["std"]
    row[f"{key}_model_std"], row[f"{key}_seed_std"] = s["model_std"], s["seed_std"]


MEMBERSHIP_KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")


def membership_fields(
    unlearned: np.ndarray,
    oracles: np.ndarray,
    originals: np.ndarray | None,
    *,
    seed: int = 0,
    fixed_variance: bool = False,
) -> dict[str, float]:
    """U-LiRA (``ulira_*``) and LiRA against the original (``lira_orig_*``) of N unlearned
    models at the forget points (:mod:`pipeline_lib.evaluation.ulira`).

    unlearned (N, |F|), oracles (N_o, |F|) and originals (N, |F|, row k the original of
    unlearned model k; None: the LiRA fields are NaN) are margins (= φ, the logit-scaled
    confidence). Fewer than 2 models on a side: NaN."""
    out = {f"{p}_{k}": float("nan") for p in ("ulira", "lira_orig") for k in MEMBERSHIP_KEYS}
    if min(unlearned.shape[0], oracles.shape[0]) < 2:
        return out
    tests = {"ulira": None}
    if originals is not None and originals.shape == unlearned.shape:
        tests["lira_orig"] = originals
    for prefix, shadow in tests.items():
        r = ulira_auc(unlearned, oracles, shadow, seed=seed, fixed_variance=fixed_variance)
        out.update({f"{prefix}_{k}": r[k] for k in MEMBERSHIP_KEYS})
    return out


def summarise(
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    oracle_margins: np.ndarray,
    oracle_metrics: Sequence[Mapping[str, float]],
    problem: Problem,
    retrain_seconds: float,
    floor_seed: int = 0,
    *,
    original_margins: np.ndarray | None = None,
    binning: str = "unlearnflow",
    ulira_fixed_variance: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Rows of the comparison table (one per method, in the given order), the noise floor
    per split, and each method's per-point KLoM scores (for the plots).

    ``results[method]``: the :func:`unlearn_one` outputs of its N unlearned models (row k
    from original k: in ``model_id`` order when the runs carry one); ``oracle_margins``
    (N_o, T) and ``oracle_metrics`` of the oracles; ``original_margins`` (N, T) of the
    originals, for LiRA against the original (None: those fields NaN). ``binning``: KLoM's
    (:mod:`pipeline_lib.evaluation.klom`), noise floor included.

    Per row: KLoM per split; UA/RA/TA mean and std over the N models; MIA-efficacy and
    loss-MIA AUC over N models × S seeded draws (:func:`_put_spread`); Avg. Gap, one per
    (model, seed), against the oracles' mean metrics at the same seed (``avg_gap``,
    ``avg_gap_std``, ...), and ``avg_gap_of_means`` (the gap of the row's mean metrics, as
    SalUn's tables compute it); U-LiRA and LiRA-vs-original at the forget points."""
    splits = problem.split_indices()
    floor = noise_floor(oracle_margins, splits, seed=floor_seed, binning=binning)
    oracle_mean = {k: float(np.mean([m[k] for m in oracle_metrics])) for k in METRICS}
    oracle_draws = {k: _draws(oracle_metrics, k) for k in SEEDED_METRICS}
    n_seeds = oracle_draws["MIA_efficacy"].shape[1]
    fixed_keys = [k for k in GAP_METRICS if k not in SEEDED_METRICS]
    f = problem.forget
    rows, scores = [], {}
    for name, runs in results.items():
        if all("model_id" in r for r in runs):
            runs = sorted(runs, key=lambda r: r["model_id"])
        um = np.stack([r["margins"] for r in runs])
        s = klom_scores(um, oracle_margins, binning=binning)
        scores[name] = s
        klom = summarize_splits(s, splits)
        row: dict[str, Any] = {"method": name, "n_models": len(runs), "klom_binning": binning}
        for split in SPLITS:
            for stat in ("p95", "p99", "mean"):
                row[f"klom_{split}_{stat}"] = klom[split][stat]
            idx = splits[split]
            # |mean unlearned margin − mean oracle margin| per point, averaged: a coarser,
            # less noisy companion of KLoM at small N
            row[f"margin_gap_{split}"] = float(
                np.abs(um[:, idx].mean(0) - oracle_margins[:, idx].mean(0)).mean()
            )
        metrics = [r["metrics"] for r in runs]
        for k in METRICS:
            if k in SEEDED_METRICS:
                _put_spread(row, k, _draws(metrics, k))
            else:
                row[k], row[f"{k}_std"] = _mean_std([m[k] for m in metrics])
        mia = _draws(metrics, "MIA_efficacy")
        if mia.shape[1] != n_seeds:
            raise ValueError(
                f"{name}: {mia.shape[1]} MIA draws per model, the oracles have {n_seeds}"
            )
        fixed = np.array([[abs(m[k] - oracle_mean[k]) for k in fixed_keys] for m in metrics])
        gaps = (
            fixed.sum(axis=1, keepdims=True) + np.abs(mia - oracle_draws["MIA_efficacy"].mean(0))
        ) / len(GAP_METRICS)
        _put_spread(row, "avg_gap", gaps)
        row["avg_gap_of_means"] = float(
            np.mean([abs(row[k] - oracle_mean[k]) for k in GAP_METRICS])
        )
        row["mia_seeds"] = n_seeds
        row.update(
            membership_fields(
                um[:, f],
                oracle_margins[:, f],
                None if original_margins is None else np.asarray(original_margins)[:, f],
                seed=floor_seed,
                fixed_variance=ulira_fixed_variance,
            )
        )
        row["seconds"], row["seconds_std"] = _mean_std([r["seconds"] for r in runs])
        row["time_over_retrain"] = (
            row["seconds"] / retrain_seconds if retrain_seconds > 0 else float("nan")
        )
        rows.append(row)
    oracle_row: dict[str, Any] = {
        "method": "oracle (retrain)",
        "n_models": len(oracle_metrics),
        "klom_binning": binning,
    }
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
        if k in SEEDED_METRICS:
            _put_spread(oracle_row, k, oracle_draws[k])
        else:
            oracle_row[k], oracle_row[f"{k}_std"] = _mean_std([m[k] for m in oracle_metrics])
    for suffix in ("", "_std", "_model_std", "_seed_std", "_of_means"):
        oracle_row[f"avg_gap{suffix}"] = 0.0
    oracle_row["mia_seeds"] = n_seeds
    # exact unlearning's value: one half of the oracles tested against the other half
    originals_a = None
    if original_margins is not None and len(original_margins) >= len(a):
        originals_a = np.asarray(original_margins)[: len(a)][:, f]
    oracle_row.update(
        membership_fields(
            oracle_margins[a][:, f],
            oracle_margins[b][:, f],
            originals_a,
            seed=floor_seed,
            fixed_variance=ulira_fixed_variance,
        )
    )
    oracle_row["seconds"], oracle_row["seconds_std"] = retrain_seconds, 0.0
    oracle_row["time_over_retrain"] = 1.0
    rows.append(oracle_row)
    return rows, floor, scores


#: (header, row key, format, key of its spread or None). KLoM headers name EasyDUB's binning
#: when the rows use it (:func:`markdown_table`).
TABLE_COLUMNS = (
    ("method", "method", "{}", None),
    ("N", "n_models", "{}", None),
    ("KLoM forget P95", "klom_forget_p95", "{:.3f}", None),
    ("KLoM forget mean", "klom_forget_mean", "{:.3f}", None),
    ("KLoM retain P95", "klom_retain_p95", "{:.3f}", None),
    ("KLoM val P95", "klom_validation_p95", "{:.3f}", None),
    ("UA", "UA", "{:.2f}", None),
    ("RA", "RA", "{:.2f}", None),
    ("TA", "TA", "{:.2f}", None),
    ("MIA-eff", "MIA_efficacy", "{:.2f}", "MIA_efficacy_std"),
    ("loss-MIA AUC", "loss_MIA_AUC", "{:.3f}", "loss_MIA_AUC_std"),
    ("Avg. Gap", "avg_gap", "{:.2f}", "avg_gap_std"),
    ("U-LiRA AUC", "ulira_auc", "{:.3f}", None),
    ("U-LiRA TPR@1%FPR", "ulira_tpr_at_1pct_fpr", "{:.3f}", None),
    ("LiRA-orig AUC", "lira_orig_auc", "{:.3f}", None),
    ("time ÷ retrain", "time_over_retrain", "{:.4f}", None),
)

BINNING_NOTES = {
    "unlearnflow": "unlearnflow (np.histogram bins, both histograms floored at 1e-5 and "
    "renormalised)",
    "easydub": "easydub (EasyDUB's published formula: np.digitize drops margins equal to the "
    "pooled maximum; only the oracles' side floored, where p > 0; not renormalised)",
}


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """The comparison table in Markdown; the oracle row's KLoM cells are the noise floor.
    Cells with a spread show mean ± std; a note under the table says what each one is."""
    binning = str(rows[0].get("klom_binning", "unlearnflow")) if rows else "unlearnflow"
    seeds = rows[0].get("mia_seeds", 1) if rows else 1

    def header(h: str) -> str:
        return h.replace("KLoM", "KLoM (EasyDUB bins)") if binning == "easydub" else h

    def cell(r: Mapping[str, Any], key: str, fmt: str, std: str | None) -> str:
        v = r.get(key, float("nan"))
        text = fmt.format(v)
        if std is not None and std in r:
            text += " ± " + fmt.format(r[std])
        return text

    head = "| " + " | ".join(header(c[0]) for c in TABLE_COLUMNS) + " |"
    sep = "|" + "---|" * len(TABLE_COLUMNS)
    body = [
        "| " + " | ".join(cell(r, k, fmt, sd) for _, k, fmt, sd in TABLE_COLUMNS) + " |"
        for r in rows
    ]
    note = (
        f"\nKLoM binning: {BINNING_NOTES.get(binning, binning)}. KLoM of the oracle row: the "
        "oracle-vs-oracle noise floor (two disjoint halves of the oracles). Accuracies: means "
        f"over the N models. MIA-efficacy and loss-MIA AUC: mean ± std over N models × {seeds} "
        "seeded draws (the CSV splits the std into model_std and seed_std). Avg. Gap: mean ± "
        "std over (model, seed) of the gap to the oracles' mean metrics at the same seed "
        "(avg_gap_of_means in the CSV: the gap of the mean metrics, as SalUn's tables). "
        "U-LiRA: AUC of telling held-out unlearned models from held-out oracles at the forget "
        "points by per-example Gaussians fitted to the method's own unlearned models and the "
        "oracles (0.5: indistinguishable from retraining); LiRA-orig: the same with the "
        "originals as the in-population (below 0.5: pushed past the oracles). Oracle row: "
        "half the oracles tested against the other half."
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


def floor_scores(
    oracle_margins: np.ndarray, seed: int = 0, binning: str = "unlearnflow"
) -> np.ndarray:
    """Per-point oracle-vs-oracle KLoM (the noise floor's distribution, for the plot)."""
    from pipeline_lib.evaluation.klom import oracle_halves

    a, b = oracle_halves(oracle_margins.shape[0], seed)
    return klom_scores(oracle_margins[a], oracle_margins[b], binning=binning)
