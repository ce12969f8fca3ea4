"""Digits, 10% random forgetting: Fisher-diagonal forgetting vs fine-tune vs retrain, averaged
over several requests/seeds, side by side with the retrained oracle.

    python benchmarks/digits_methods.py --seeds 5

For each seed s: a fresh prepared split, a 10% random forget request (seed s), the original
model (seed s), the oracle retrained on R (seed s+100); every method runs on the same
original. Prints mean ± std of forget accuracy, TA, MIA-efficacy, Avg. Gap and the
unlearning-time ÷ retraining-time ratio (Fisher statistics counted in unlearning time).
The "cheap stats" row uses the empirical Fisher and 256 retain samples for I_R.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

from pipeline_lib.config import Params, replace
from pipeline_lib.data.images import RawDataset, assign_split, load_digits_source
from pipeline_lib.evaluation.metrics import EvalSplits, avg_gap, evaluate_model
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.fit import FitSettings, fit


def variants(params: Params) -> dict[str, tuple[str, object]]:
    fd = params.unlearn.fisher_diagonal
    out: dict[str, tuple[str, object]] = {}
    for frac in (0.05, 0.2, 0.4):
        for reset in ("reinit", "zero"):
            out[f"fisher_diagonal top={frac} {reset}"] = (
                "fisher_diagonal",
                replace(fd, top_fraction=frac, reset=reset),
            )
    out["fisher_diagonal top=0.2 zero, cheap stats"] = (
        "fisher_diagonal",
        replace(fd, top_fraction=0.2, reset="zero"),
    )
    out["finetune"] = ("finetune", params.unlearn.finetune)
    out["retrain"] = ("retrain", params.unlearn.retrain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = Params()
    t = params.train
    raw: RawDataset = load_digits_source(params.data)
    settings = FitSettings(t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum)
    rows: dict[str, list[dict[str, float]]] = {}
    for s in range(args.seeds):
        split = assign_split(raw, replace(params.data, seed=s))
        train_idx = np.flatnonzero(split == "train")
        test_idx = np.flatnonzero(split == "test")
        rng = np.random.default_rng(s)
        forget_idx = np.sort(
            rng.choice(train_idx, int(round(args.fraction * len(train_idx))), replace=False)
        )
        retain_idx = np.setdiff1d(train_idx, forget_idx)
        T = lambda idx: (torch.from_numpy(raw.X[idx]), torch.from_numpy(raw.y[idx]))  # noqa: E731
        (fX, fy), (rX, ry), (teX, tey), (trX, try_) = (
            T(forget_idx),
            T(retain_idx),
            T(test_idx),
            T(train_idx),
        )
        factory = lambda seed: build_model(params.model, raw.X.shape[1:], raw.n_classes, seed)  # noqa: E731
        original = fit(factory(s), trX, try_, settings, s)
        t0 = time.perf_counter()
        oracle = fit(factory(s + 100), rX, ry, settings, s + 100)
        retrain_s = time.perf_counter() - t0
        splits = EvalSplits(fX, fy, rX, ry, teX, tey)
        ev = params.evaluate
        oracle_m = evaluate_model(oracle, splits, ev.mia_svc_c, ev.mia_folds, s)
        orig_m = evaluate_model(original, splits, ev.mia_svc_c, ev.mia_folds, s)
        rows.setdefault("original", []).append(
            {**orig_m, "avg_gap": avg_gap(orig_m, oracle_m), "ratio": 0.0}
        )
        rows.setdefault("oracle", []).append({**oracle_m, "avg_gap": 0.0, "ratio": 1.0})
        t0 = time.perf_counter()
        fk = params.fisher
        IF = fisher_diagonal(original, fX, fy, fk.kind, fk.batch_size, fk.seed)
        IR = fisher_diagonal(original, rX, ry, fk.kind, fk.batch_size, fk.seed)
        fisher_s = time.perf_counter() - t0
        inputs = UnlearnInputs(fX, fy, rX, ry, factory, t, IF, IR)
        # Cheaper statistics: empirical Fisher (one gradient per sample instead of one per
        # class) with I_R from a 256-sample subsample of R.
        t0 = time.perf_counter()
        sub = torch.from_numpy(np.sort(rng.choice(len(rX), min(256, len(rX)), replace=False)))
        cheap = UnlearnInputs(
            fX,
            fy,
            rX,
            ry,
            factory,
            t,
            fisher_diagonal(original, fX, fy, "empirical", fk.batch_size),
            fisher_diagonal(original, rX[sub], ry[sub], "empirical", fk.batch_size),
        )
        cheap_s = time.perf_counter() - t0
        for label, (name, mparams) in variants(params).items():
            method = get_method(name)
            is_cheap = label.endswith("cheap stats")
            t0 = time.perf_counter()
            model, _ = method.fn(copy.deepcopy(original), cheap if is_cheap else inputs, mparams, s)
            stats_s = (cheap_s if is_cheap else fisher_s) if method.needs_fisher else 0.0
            secs = time.perf_counter() - t0 + stats_s
            m = evaluate_model(model, splits, ev.mia_svc_c, ev.mia_folds, s)
            rows.setdefault(label, []).append(
                {**m, "avg_gap": avg_gap(m, oracle_m), "ratio": secs / retrain_s}
            )
        print(f"seed {s} done (retrain {retrain_s:.2f}s, Fisher {fisher_s:.2f}s)", file=sys.stderr)

    cols = ("forget_acc", "TA", "RA", "MIA_efficacy", "avg_gap", "ratio")
    print(
        f"python benchmarks/digits_methods.py --seeds {args.seeds} --fraction {args.fraction}  "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(f"| {'model':<34} | " + " | ".join(f"{c:>14}" for c in cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for label, rs in rows.items():
        cells = []
        for c in cols:
            vals = np.array([r[c] for r in rs])
            cells.append(f"{vals.mean():7.2f} ± {vals.std():4.2f}")
        print(f"| {label:<34} | " + " | ".join(f"{x:>14}" for x in cells) + " |")


if __name__ == "__main__":
    main()
