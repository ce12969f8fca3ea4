"""Sequential model versions (issue 15): reuse the base version's full-data Fisher sums minus
the tombstones, or recompute them on each new version? Error of the reuse, measured.

    python -m benchmarks.sequential_stats --dataset digits --requests 5 --seeds 3

Per seed s: the pipeline's split of the dataset, the base version θ_1 trained on D (seed s)
and its full-data sums Σ_D(θ_1). Then ``--requests`` requests in a chain, each forgetting a
random ``--fraction`` of what is left; request j unlearns from version θ_j with
``--method`` and its result is version θ_{j+1}, as in the deletion service. For each
request j ≥ 2 (request 1's parent is the base, where both are exact), I_R of the request:

- *recomputed* (what the service does): Σ over D_j = D − F_1 − … − F_{j−1} of the parent
  θ_j, minus the request's Σ_{F_j}(θ_j): exact for θ_j;
- *reused*: Σ_D(θ_1) − Σ_{F_1 ∪ … ∪ F_j}(θ_1): the base version's sums minus the
  tombstones and the request, no new full-data pass; its error is that θ_j ≠ θ_1.

Printed per request: the relative error of the reused I_R (‖Δ‖₂/‖I_R‖₂ and the largest
entry's error relative to the largest entry), the overlap (Jaccard) of the weights the method
selects with each, and forget accuracy / TA of the version unlearned with each I_R. Both
chains continue from the recomputed version, so the comparison is one step at a time.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

from benchmarks.request_cost import load
from pipeline_lib.config import ModelConfig, Params
from pipeline_lib.evaluation.metrics import EvalSplits, evaluate_model
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal_sum
from pipeline_lib.training.fit import FitSettings, fit


def selection(method: str, i_f, i_r, n_f: int, n_r: int, params) -> dict[str, torch.Tensor]:
    """The weights the method changes (bool masks): fisher_diagonal's top fraction of
    I_F/(I_R+ε); ssd's I_F > α·I_D."""
    from pipeline_lib.methods.fisher_diagonal import select_by_ratio

    if method == "fisher_diagonal":
        p = params.unlearn.fisher_diagonal
        return select_by_ratio(i_f, i_r, p.eps, p.threshold, p.top_fraction)[0]
    alpha = params.unlearn.ssd.alpha
    i_d = {k: (n_f * i_f[k] + n_r * i_r[k]) / (n_f + n_r) for k in i_f}
    return {k: i_f[k] > alpha * i_d[k] for k in i_f}


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / union if union else 1.0


def chain(s, args, params, settings, model_cfg, rows, secs) -> None:
    """One seed's chain of requests; appends a row per request j >= 2 to ``rows``."""
    t, fk = params.train, params.fisher
    method = get_method(args.method)
    mparams = getattr(params.unlearn, args.method)
    opts = {"kind": fk.kind, "batch_size": fk.batch_size, "seed": fk.seed}
    raw, tr, te = load(args.dataset, args.max_train, s)
    T = lambda idx: (torch.from_numpy(raw.X[idx]), torch.from_numpy(raw.y[idx]))  # noqa: E731
    ids = lambda idx: [str(i) for i in raw.ids[idx]]  # noqa: E731

    def sums(model, idx):
        X, y = T(idx)
        return fisher_diagonal_sum(
            model, X, y, **opts, sample_ids=ids(idx), sum_dtype=torch.float64
        )

    factory = lambda seed: build_model(model_cfg, raw.X.shape[1:], raw.n_classes, seed)  # noqa: E731
    base = fit(factory(s), *T(tr), settings, s)
    (full_base, n_base) = sums(base, tr)
    teX, tey = T(te)
    rng = np.random.default_rng(1000 + s)
    left, gone = tr.copy(), np.array([], dtype=tr.dtype)
    parent = base
    for j in range(1, args.requests + 1):
        f_idx = np.sort(rng.choice(left, int(round(args.fraction * len(left))), replace=False))
        r_idx = np.setdiff1d(left, f_idx)
        fX, fy = T(f_idx)
        rX, ry = T(r_idx)
        sf, nf = sums(parent, f_idx)
        i_f = {k: (v / nf).float() for k, v in sf.items()}
        t0 = time.perf_counter()
        full_j, n_j = sums(parent, left)  # the service: Σ over D_j of the new version
        secs["full_sums"].append(time.perf_counter() - t0)
        exact = {k: ((full_j[k] - sf[k]) / (n_j - nf)).clamp_min(0).float() for k in sf}
        t0 = time.perf_counter()
        tomb, nt = sums(base, np.concatenate([gone, f_idx]))  # tombstones + request, at θ_1
        secs["tombstone_sums"].append(time.perf_counter() - t0)
        reused = {k: ((full_base[k] - tomb[k]) / (n_base - nt)).clamp_min(0).float() for k in sf}
        assert n_base - nt == len(r_idx) == n_j - nf
        diff = torch.cat([(reused[k] - exact[k]).flatten() for k in exact])
        ref = torch.cat([exact[k].flatten() for k in exact])
        row = {
            "rel_l2": float(diff.norm() / ref.norm()),
            "rel_max": float(diff.abs().max() / ref.abs().max()),
            "jaccard": jaccard(
                selection(args.method, i_f, exact, nf, len(r_idx), params),
                selection(args.method, i_f, reused, nf, len(r_idx), params),
            ),
        }
        splits = EvalSplits(fX, fy, rX, ry, teX, tey)
        out = {}
        for label, i_r in (("recomputed", exact), ("reused", reused)):
            inputs = UnlearnInputs(fX, fy, rX, ry, factory, t, i_f, i_r)
            model, _ = method.fn(copy.deepcopy(parent), inputs, mparams, s)
            ev = params.evaluate
            m = evaluate_model(model, splits, ev.mia_svc_c, ev.mia_folds, s)
            row[f"FA {label}"], row[f"TA {label}"] = m["forget_acc"], m["TA"]
            out[label] = model
        if j > 1:
            rows.setdefault(j, []).append(row)
        print(f"seed {s} request {j}: {row}", file=sys.stderr, flush=True)
        parent = out["recomputed"]
        gone, left = np.concatenate([gone, f_idx]), r_idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--method", default="fisher_diagonal", choices=("fisher_diagonal", "ssd"))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = Params()
    t, fk = params.train, params.fisher
    settings = FitSettings(
        args.epochs or t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum
    )
    model_cfg = ModelConfig(name=args.model) if args.model != params.model.name else params.model
    rows: dict[int, list[dict[str, float]]] = {}
    secs: dict[str, list[float]] = {"full_sums": [], "tombstone_sums": []}
    for s in range(args.seeds):
        chain(s, args, params, settings, model_cfg, rows, secs)
    print(
        f"python -m benchmarks.sequential_stats --dataset {args.dataset} --model {args.model} "
        f"--max-train {args.max_train} --fraction {args.fraction} --requests {args.requests} "
        f"--method {args.method} --epochs {settings.epochs} --seeds {args.seeds}  "
        f"(fisher.kind {fk.kind}, load {os.getloadavg()[0]:.1f})"
    )
    cols = list(next(iter(rows.values()))[0])
    print("| request | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for j, rs in rows.items():
        cells = []
        for c in cols:
            v = np.array([r[c] for r in rs])
            d = 4 if c in ("rel_l2", "rel_max", "jaccard") else 2
            cells.append(f"{v.mean():.{d}f} ± {v.std():.{d}f}")
        print(f"| {j} | " + " | ".join(cells) + " |")
    for k, v in secs.items():
        print(f"{k} seconds: mean {np.mean(v):.3f} (per request)")


if __name__ == "__main__":
    main()
