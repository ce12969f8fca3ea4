"""Per-request cost of the Fisher-based methods ÷ retraining, today's against the amortised
statistics (issue 15), with forgetting quality side by side, in one process and one run.

    python -m benchmarks.request_cost --dataset digits --seeds 3
    python -m benchmarks.request_cost --dataset fashion-mnist --model cnn --max-train 10000

Per seed s: the pipeline's split of the dataset (``--max-train``: a seeded subsample of the
training split), a random ``--fraction`` forget request, the original trained on D (seed s),
the oracle retrained on R = D − F (seed s+100; its wall time is the retraining time).

Statistics, ``fisher.kind`` true_expected unless said:

- *today*: I_F and I_R computed per request, I_R over the whole retain set (``retain_from:
  direct``);
- *amortised*: Σ_D of the original computed once (the amortised cost, not per request),
  per request only Σ_F and I_R = (Σ_D − Σ_F)/(N − |F|) (``retain_from: full_minus_forget``);
- *batch_squared*: SSD's own importance (squared gradient of the batch-mean loss per batch of
  ``fisher.batch_size``), I_F and I_R per request (ssd only; its default α = 2: the method
  mixes I_D from I_F and I_R, so I_F/I_D <= |D|/|F| = 10 holds here too and the paper's
  α = 10 selects nothing).

Rows: ssd, fisher_forgetting, fisher_diagonal (the full retain set, and with
``retain_sample_multiple`` k = 3: fine-tuning on 3·|F| seeded retain points). Per-request
time = the request's statistics + the method; ÷ the retraining time of the same seed.
Quality: forget accuracy, TA, MIA-efficacy (percent), mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

from pipeline_lib.config import ModelConfig, Params, replace
from pipeline_lib.data.images import DataConfig, assign_split, load_digits_source
from pipeline_lib.evaluation.metrics import EvalSplits, evaluate_model
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal, fisher_diagonal_sum
from pipeline_lib.stats.store import retain_from_full
from pipeline_lib.training.fit import FitSettings, fit


def load(name: str, max_train: int | None, seed: int):
    cfg = DataConfig(name=name, seed=seed)
    if name == "digits":
        raw = load_digits_source(cfg)
    else:
        from pipeline_lib.data.images import load_fashion_mnist_source

        raw = load_fashion_mnist_source(cfg)
    split = assign_split(raw, cfg)
    tr, te = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    rng = np.random.default_rng(seed)
    if max_train is not None and max_train < len(tr):
        tr = np.sort(rng.choice(tr, max_train, replace=False))
    if max_train is not None and len(te) > max_train // 4:
        te = np.sort(rng.choice(te, max_train // 4, replace=False))
    return raw, tr, te


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def one_seed(s, args, params, settings, model_cfg, add, extra):
    """One request on seed ``s``; appends its rows through ``add``. Returns (|D|, |F|)."""
    t, fk, u = params.train, params.fisher, params.unlearn
    raw, tr, te = load(args.dataset, args.max_train, s)
    rng = np.random.default_rng(s)
    f_idx = np.sort(rng.choice(tr, int(round(args.fraction * len(tr))), replace=False))
    r_idx = np.setdiff1d(tr, f_idx)
    T = lambda idx: (torch.from_numpy(raw.X[idx]), torch.from_numpy(raw.y[idx]))  # noqa: E731
    (fX, fy), (rX, ry), (teX, tey), (dX, dy) = T(f_idx), T(r_idx), T(te), T(tr)
    ids = lambda idx: [str(i) for i in raw.ids[idx]]  # noqa: E731
    shape = raw.X.shape[1:]
    factory = lambda seed: build_model(model_cfg, shape, raw.n_classes, seed)  # noqa: E731
    original = fit(factory(s), dX, dy, settings, s)
    oracle, retrain_s = timed(fit, factory(s + 100), rX, ry, settings, s + 100)
    splits = EvalSplits(fX, fy, rX, ry, teX, tey)
    add("original", original, 0.0, retrain_s, splits, s)
    add("retrain (oracle)", oracle, retrain_s, retrain_s, splits, s)
    opts = {"kind": fk.kind, "batch_size": fk.batch_size, "seed": fk.seed}

    # today: I_F and I_R over R, per request
    IF, f_s = timed(fisher_diagonal, original, fX, fy, **opts, sample_ids=ids(f_idx))
    IR, r_s = timed(fisher_diagonal, original, rX, ry, **opts, sample_ids=ids(r_idx))
    today_s = f_s + r_s
    # amortised: Σ_D once; per request Σ_F and one subtraction
    (full, n), full_s = timed(
        fisher_diagonal_sum,
        original,
        dX,
        dy,
        **opts,
        sample_ids=ids(tr),
        sum_dtype=torch.float64,
    )
    t0 = time.perf_counter()
    sf, nf = fisher_diagonal_sum(
        original, fX, fy, **opts, sample_ids=ids(f_idx), sum_dtype=torch.float64
    )
    IF_a = {k: (v / nf).float() for k, v in sf.items()}
    IR_a = {k: v.float() for k, v in retain_from_full(full, n, sf, nf).items()}
    amort_req_s = time.perf_counter() - t0
    err = max(float(((IR_a[k] - IR[k]).abs() / (IR[k].abs().max() + 1e-30)).max()) for k in IR)
    # batch_squared, per request (SSD's importance)
    bopts = {**opts, "kind": "batch_squared"}
    (IF_b, IR_b), b_s = timed(
        lambda: (
            fisher_diagonal(original, fX, fy, **bopts),
            fisher_diagonal(original, rX, ry, **bopts),
        )
    )
    extra.setdefault("retrain_s", []).append(retrain_s)
    extra.setdefault("today_stats_s", []).append(today_s)
    extra.setdefault("full_sums_s", []).append(full_s)
    extra.setdefault("amortised_request_stats_s", []).append(amort_req_s)
    extra.setdefault("batch_squared_stats_s", []).append(b_s)
    extra.setdefault("derived_IR_max_rel_err", []).append(err)
    extra.setdefault("break_even_requests", []).append(full_s / (today_s - amort_req_s))

    stats = {
        "today": (IF, IR, today_s),
        "amortised": (IF_a, IR_a, amort_req_s),
        "batch_squared": (IF_b, IR_b, b_s),
    }
    fd = u.fisher_diagonal
    variants = [
        ("ssd", u.ssd, "today"),
        ("ssd", u.ssd, "amortised"),
        ("ssd", u.ssd, "batch_squared"),
        ("fisher_forgetting", u.fisher_forgetting, "today"),
        ("fisher_forgetting", u.fisher_forgetting, "amortised"),
        ("fisher_diagonal", fd, "today"),
        ("fisher_diagonal", fd, "amortised"),
        ("fisher_diagonal", replace(fd, retain_sample_multiple=3.0), "amortised"),
    ]
    for name, mparams, source in variants:
        i_f, i_r, stats_s = stats[source]
        inputs = UnlearnInputs(fX, fy, rX, ry, factory, t, i_f, i_r)
        method = get_method(name)
        (model, _), m_s = timed(method.fn, copy.deepcopy(original), inputs, mparams, s)
        k = getattr(mparams, "retain_sample_multiple", None)
        label = f"{name} [{source}"
        label += f", k={k:g}]" if k else "]"
        add(label, model, stats_s + m_s, retrain_s, splits, s)
    print(
        f"seed {s}: retrain {retrain_s:.2f}s, today's stats {today_s:.2f}s, full sums "
        f"{full_s:.2f}s, per-request stats {amort_req_s:.3f}s",
        file=sys.stderr,
    )
    return len(tr), len(f_idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: params)")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = Params()
    t = params.train
    epochs = args.epochs or t.epochs
    settings = FitSettings(epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum)
    model_cfg = ModelConfig(name=args.model) if args.model != params.model.name else params.model
    rows: dict[str, list[dict[str, float]]] = {}
    extra: dict[str, list[float]] = {}

    def add(label: str, model, secs: float, retrain_s: float, splits, s: int) -> None:
        ev = params.evaluate
        m = evaluate_model(model, splits, ev.mia_svc_c, ev.mia_folds, s)
        rows.setdefault(label, []).append({**m, "seconds": secs, "ratio": secs / retrain_s})

    for s in range(args.seeds):
        n_tr, n_f = one_seed(s, args, params, settings, model_cfg, add, extra)
    print(
        f"python -m benchmarks.request_cost --dataset {args.dataset} --model {args.model} "
        f"--max-train {args.max_train} --fraction {args.fraction} --epochs {epochs} "
        f"--seeds {args.seeds}  (|D|={n_tr}, |F|={n_f}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})"
    )
    cols = ("forget_acc", "TA", "MIA_efficacy", "seconds", "ratio")
    print(f"| {'row':<44} | " + " | ".join(f"{c:>15}" for c in cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for label, rs in rows.items():
        cells = []
        for c in cols:
            v = np.array([r[c] for r in rs])
            d = 4 if c == "ratio" else 2
            cells.append(f"{v.mean():.{d}f} ± {v.std():.{d}f}")
        print(f"| {label:<44} | " + " | ".join(f"{x:>15}" for x in cells) + " |")
    print()
    for k, v in extra.items():
        print(f"{k}: {np.mean(v):.4g} (per seed: {', '.join(f'{x:.4g}' for x in v)})")


if __name__ == "__main__":
    main()
