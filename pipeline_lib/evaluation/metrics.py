"""Unlearning evaluation (shared/reference/evaluation.md): accuracies, MIA, Avg. Gap, cost.

- UA = 100 − accuracy on F, RA = accuracy on R, TA = accuracy on the test split.
- MIA-efficacy (SalUn, ICLR 2024): an RBF SVC (C=3, gamma='auto') on the confidence p_y(x),
  members = a retain subset the size of the test split, non-members = the test split;
  efficacy = 100 × fraction of F predicted non-member. Compared with Retrain's value.
- Loss MIA AUC (SCRUB): logistic regression on the per-sample loss, F (1) vs test (0),
  class-balanced, cross-validated; 0.5 means indistinguishable.
- Avg. Gap = mean(|UA−UA_R|, |RA−RA_R|, |TA−TA_R|, |MIA−MIA_R|) against the retrained oracle.

Spread, not single draws. Both MIAs are random: the SVC's member subsample (retain points) and
the loss MIA's subsample and cross-validation folds depend on a seed, and on a separable
confidence table the same model scores 0 or 100 depending on it. ``evaluate.mia_seeds`` = S
draws use the seeds ``evaluate.seed``, ``evaluate.seed + 1``, … (:func:`mia_seed_list`):

- ``MIA_efficacy`` / ``loss_MIA_AUC``: the mean over the S draws; ``…_std``: their standard
  deviation (ddof 1; 0 for one draw); ``…_draws``: the S values, in seed order.
- ``avg_gap`` (:func:`build_report`): the mean over the S draws of the Avg. Gap of draw s of
  the model against draw s of the oracle (same seed, so the same subsample of points), and
  ``avg_gap_std`` their spread (:func:`avg_gap_draws`).

The old single number is the S = 1 case (``evaluate.mia_seeds: 1``): one SVC fit / one
cross-validated regression with seed ``evaluate.seed``; it is always ``…_draws[0]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline_lib.io import atomic_path
from pipeline_lib.training.fit import predict_logits

GAP_METRICS = ("UA", "RA", "TA", "MIA_efficacy")
#: The metrics computed once per seed (the others are deterministic given the model).
SEEDED_METRICS = ("MIA_efficacy", "loss_MIA_AUC")


@dataclass(frozen=True)
class EvalSplits:
    forget_X: torch.Tensor
    forget_y: torch.Tensor
    retain_X: torch.Tensor
    retain_y: torch.Tensor
    test_X: torch.Tensor
    test_y: torch.Tensor


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((logits.argmax(-1) == y).float().mean())


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return nn.functional.cross_entropy(logits.double(), y, reduction="none").numpy()


def confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """p_y(x), the model's probability of the true label."""
    return logits.double().softmax(-1).gather(1, y[:, None]).squeeze(1).numpy()


def mia_efficacy(
    conf_retain: np.ndarray, conf_test: np.ndarray, conf_forget: np.ndarray, c: float, seed: int
) -> float:
    """SalUn's MIA-efficacy in percent (see module docstring)."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    n = min(len(conf_retain), len(conf_test))
    members = conf_retain[rng.choice(len(conf_retain), size=n, replace=False)]
    nonmembers = conf_test[rng.choice(len(conf_test), size=n, replace=False)]
    features = np.concatenate([members, nonmembers])[:, None]
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    svc = SVC(C=c, gamma="auto", kernel="rbf").fit(features, labels)
    return 100.0 * float((svc.predict(conf_forget[:, None]) == 0).mean())


def loss_mia_auc(loss_forget: np.ndarray, loss_test: np.ndarray, folds: int, seed: int) -> float:
    """Cross-validated AUC of a logistic regression telling F (1) from test (0) by loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    n = min(len(loss_forget), len(loss_test))
    if n < 2:
        return float("nan")
    f = loss_forget[rng.choice(len(loss_forget), size=n, replace=False)]
    t = loss_test[rng.choice(len(loss_test), size=n, replace=False)]
    features = np.log1p(np.concatenate([f, t]))[:, None]
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    k = max(2, min(folds, n))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = cross_val_predict(
        LogisticRegression(), features, labels, cv=cv, method="predict_proba"
    )[:, 1]
    return float(roc_auc_score(labels, scores))


def mia_seed_list(seed: int, n_seeds: int) -> list[int]:
    """The seeds of ``n_seeds`` MIA draws: seed, seed + 1, …; the first is the single draw."""
    if isinstance(n_seeds, bool) or int(n_seeds) != n_seeds or n_seeds < 1:
        raise ValueError(f"n_seeds must be a positive integer; got {n_seeds!r}")
    return [int(seed) + i for i in range(int(n_seeds))]


def mia_efficacy_draws(
    conf_retain: np.ndarray,
    conf_test: np.ndarray,
    conf_forget: np.ndarray,
    c: float,
    seeds: Sequence[int],
) -> np.ndarray:
    """:func:`mia_efficacy` once per seed: (len(seeds),) float64, in seed order."""
    return np.array([mia_efficacy(conf_retain, conf_test, conf_forget, c, s) for s in seeds])


def loss_mia_auc_draws(
    loss_forget: np.ndarray, loss_test: np.ndarray, folds: int, seeds: Sequence[int]
) -> np.ndarray:
    """:func:`loss_mia_auc` once per seed (subsample and folds): (len(seeds),) float64."""
    return np.array([loss_mia_auc(loss_forget, loss_test, folds, s) for s in seeds])


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of ``values``."""
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def draw_spread(draws: np.ndarray) -> dict[str, float]:
    """Spread of a metric measured by N models × S seeded draws: draws (N, S).

    Returns ``mean`` (over all draws), ``std`` (over all N·S draws, ddof 1: how far one
    model's one draw may fall), ``model_std`` (std of the N per-model means: the spread between
    models) and ``seed_std`` (the mean over models of the std of its S draws: the measurement
    noise alone; 0 when S = 1). With S = 1, ``std`` = ``model_std``."""
    d = np.asarray(draws, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"draws must be a non-empty 2-D array (models, seeds); got {d.shape}")
    mean, std = mean_std(d)
    return {
        "mean": mean,
        "std": std,
        "model_std": mean_std(d.mean(axis=1))[1],
        "seed_std": float(np.mean([mean_std(row)[1] for row in d])),
    }


def evaluate_model(
    model: nn.Module,
    splits: EvalSplits,
    c: float = 3.0,
    folds: int = 5,
    seed: int = 0,
    n_seeds: int = 1,
) -> dict[str, float]:
    """Accuracy and membership-inference metrics of one model (percent except the AUC); the
    MIAs as the mean, std and values of ``n_seeds`` seeded draws (module docstring)."""
    return metrics_from_logits(
        predict_logits(model, splits.forget_X),
        splits.forget_y,
        predict_logits(model, splits.retain_X),
        splits.retain_y,
        predict_logits(model, splits.test_X),
        splits.test_y,
        c,
        folds,
        seed,
        n_seeds,
    )


def metrics_from_logits(
    lf: torch.Tensor,
    yf: torch.Tensor,
    lr: torch.Tensor,
    yr: torch.Tensor,
    lt: torch.Tensor,
    yt: torch.Tensor,
    c: float = 3.0,
    folds: int = 5,
    seed: int = 0,
    n_seeds: int = 1,
) -> dict[str, float]:
    """:func:`evaluate_model` from the logits on forget (lf), retain (lr) and test (lt)."""
    fa = accuracy(lf, yf)
    seeds = mia_seed_list(seed, n_seeds)
    draws = {
        "MIA_efficacy": mia_efficacy_draws(
            confidence(lr, yr), confidence(lt, yt), confidence(lf, yf), c, seeds
        ),
        "loss_MIA_AUC": loss_mia_auc_draws(
            per_sample_loss(lf, yf), per_sample_loss(lt, yt), folds, seeds
        ),
    }
    out: dict = {"forget_acc": fa, "UA": 100.0 - fa, "RA": accuracy(lr, yr), "TA": accuracy(lt, yt)}
    for k, d in draws.items():
        out[k], out[f"{k}_std"] = mean_std(d)
        out[f"{k}_draws"] = [float(v) for v in d]
    return out


def avg_gap(metrics: Mapping[str, float], oracle: Mapping[str, float]) -> float:
    """Mean absolute gap to the retrained oracle over UA, RA, TA and MIA-efficacy (of the
    values in the two dicts: with seeded draws, the gap of the means; :func:`avg_gap_draws`
    pairs the draws)."""
    return float(np.mean([abs(metrics[k] - oracle[k]) for k in GAP_METRICS]))


def avg_gap_draws(metrics: Mapping, oracle: Mapping) -> np.ndarray:
    """Avg. Gap of each seeded draw: draw s of the model against draw s of the oracle.

    Both dicts as :func:`metrics_from_logits` returns them; with ``MIA_efficacy_draws`` of the
    same length in both, returns one gap per draw, else the single :func:`avg_gap`."""
    md, od = metrics.get("MIA_efficacy_draws"), oracle.get("MIA_efficacy_draws")
    if md is None or od is None or len(md) != len(od):
        return np.array([avg_gap(metrics, oracle)])
    fixed = [abs(metrics[k] - oracle[k]) for k in GAP_METRICS if k != "MIA_efficacy"]
    return np.array([np.mean([*fixed, abs(a - b)]) for a, b in zip(md, od, strict=True)])


def build_report(
    models: Mapping[str, Mapping[str, float]],
    unlearn_seconds: float,
    retrain_seconds: float,
    extra: Mapping[str, object] | None = None,
) -> dict:
    """Assemble the JSON report: per-model metrics with Avg. Gap to ``models['oracle']``
    (NaN when the request was not compared against an oracle) and its spread over the seeded
    MIA draws (``avg_gap_std``, :func:`avg_gap_draws`), and the cost of unlearning relative to
    retraining (NaN ratio without a retrain time)."""
    oracle = models.get("oracle")
    table = {}
    for name, m in models.items():
        if oracle:
            gap, gap_std = mean_std(avg_gap_draws(m, oracle))
        else:
            gap, gap_std = float("nan"), float("nan")
        table[name] = {**m, "avg_gap": gap, "avg_gap_std": gap_std}
    extra = dict(extra or {})
    return {
        "models": table,
        # extra["cost"]: the request's cost split (:func:`request_cost`), in the same block
        "cost": {**cost(unlearn_seconds, retrain_seconds), **dict(extra.pop("cost", None) or {})},
        **extra,
    }


def cost(unlearn_seconds: float, retrain_seconds: float) -> dict[str, float]:
    """The cost block of a report: both times and their ratio (NaN without a retrain time)."""
    return {
        "unlearn_seconds": unlearn_seconds,
        "retrain_seconds": retrain_seconds,
        "unlearn_over_retrain": unlearn_seconds / retrain_seconds
        if retrain_seconds > 0
        else float("nan"),
    }


def request_cost(
    forget_stats_seconds: float,
    retain_stats_seconds: float,
    method_seconds: float,
    amortised_seconds: float,
    direct_retain_seconds: float,
) -> dict[str, float]:
    """A request's own cost, apart from what is amortised over the requests of a version.

    - ``request_seconds``: the request's own statistics (I_F, and I_R: computed directly, or
      derived from the version's full-data sums by one subtraction) plus the method.
    - ``amortised_stats_seconds``: the version's full-data statistics (0 when I_R is direct).
    - ``direct_request_seconds``: what the request would cost with I_R computed over R.
    - ``break_even_requests``: amortised ÷ (direct request cost − request cost), the number
      of requests from one version after which the full-data statistics have paid for
      themselves (inf when nothing is saved per request, 0 when nothing is amortised).
    """
    request = forget_stats_seconds + retain_stats_seconds + method_seconds
    direct = forget_stats_seconds + direct_retain_seconds + method_seconds
    saved = direct - request
    if amortised_seconds <= 0:
        even = 0.0
    else:
        even = amortised_seconds / saved if saved > 0 else float("inf")
    return {
        "request_seconds": request,
        "request_stats_seconds": forget_stats_seconds + retain_stats_seconds,
        "amortised_stats_seconds": amortised_seconds,
        "direct_request_seconds": direct,
        "break_even_requests": even,
    }


SUMMARY_COLUMNS = ("forget_acc", "RA", "TA", "UA", "MIA_efficacy", "loss_MIA_AUC", "avg_gap")


def format_table(
    report: Mapping,
    columns: tuple[str, ...] = SUMMARY_COLUMNS,
    width: int = 14,
    digits: int = 3,
) -> str:
    """Plain-text summary table of a report (one row per model) plus the cost line. A metric
    with a spread (``<column>_std`` > 0: seeded MIA draws, Avg. Gap) shows as mean±std."""
    roles = ("original", "oracle", "unlearned")  # this order, whatever order the JSON kept
    models = report["models"]
    names = [r for r in roles if r in models] + [n for n in models if n not in roles]

    def cell(m: Mapping, c: str) -> str:
        v, sd = m.get(c, float("nan")), m.get(f"{c}_std")
        text = f"{v:.{digits}f}"
        if isinstance(sd, float) and np.isfinite(sd) and sd > 0:
            text += f"±{sd:.{digits}f}"
        return text

    cells = {n: [cell(models[n], c) for c in columns] for n in names}
    widths = [
        max([width, len(c) + 1, *(len(cells[n][i]) + 2 for n in names)])
        for i, c in enumerate(columns)
    ]
    header = f"{'model':<12}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    lines = [header, "-" * len(header)]
    for name in names:
        lines.append(
            f"{name:<12}" + "".join(f"{t:>{w}}" for t, w in zip(cells[name], widths, strict=True))
        )
    c = report["cost"]
    lines.append(
        f"unlearning {c['unlearn_seconds']:.2f}s vs retraining {c['retrain_seconds']:.2f}s "
        f"(ratio {c['unlearn_over_retrain']:.{digits}f})"
    )
    if c.get("amortised_stats_seconds"):
        lines.append(
            f"request's own cost {c['request_seconds']:.2f}s (statistics "
            f"{c['request_stats_seconds']:.2f}s); amortised full-data statistics "
            f"{c['amortised_stats_seconds']:.2f}s, break-even after "
            f"{c['break_even_requests']:.1f} requests"
        )
    return "\n".join(lines)


def plot_report(report: Mapping, path: str | Path) -> None:
    """Grouped bars per metric for every model in the report, written atomically as PNG.

    Left panel: accuracies, y-axis zoomed so that gaps of a point or two stay visible;
    right panel: MIA-efficacy and Avg. Gap. Each bar carries its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    panels = (
        ("accuracy (%)", ["forget_acc", "RA", "TA"]),
        ("privacy / gap", ["MIA_efficacy", "avg_gap"]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    for ax, (ylabel, metrics) in zip(axes, panels, strict=True):
        x = np.arange(len(metrics))
        values = []
        for i, name in enumerate(names):
            vals = [float(report["models"][name].get(m, float("nan"))) for m in metrics]
            values += [v for v in vals if np.isfinite(v)]  # no oracle: Avg. Gap is NaN
            bars = ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_xticks(x, metrics)
        ax.set_ylabel(ylabel)
        if ylabel.startswith("accuracy"):
            ax.set_ylim(max(0.0, min(values + [100.0]) - 5.0), 101.0)
        else:
            ax.set_ylim(0.0, max(values + [1.0]) * 1.15)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(str(report.get("title", "unlearning evaluation")))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
