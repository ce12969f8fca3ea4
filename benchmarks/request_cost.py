"""Per-request cost of the Fisher-based methods ÷ retraining, today's against the amortised
statistics (issue 15), with forgetting quality side by side, in one process and one run.

    python -m benchmarks.request_cost --dataset digits --seeds 3
    python -m benchmarks.request_cost --dataset fashion-mnist --model cnn --max-train 10000
    python -m benchmarks.request_cost --dataset fashion-mnist --model cnn --device cuda

``--device cuda``: training, the statistics and the unlearning step run on the GPU (full
float32: TF32 off for matmuls and cuDNN); the evaluation runs on the CPU. Times are wall
seconds after a CUDA synchronise; the CPU-seconds columns then mean little.

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


def load(name: str, max_train: int | None, seed: int, max_test: int | None = None):
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
    if max_test is None and max_train is not None:
        max_test = max_train // 4
    if max_test is not None and len(te) > max_test:
        te = np.sort(rng.choice(te, max_test, replace=False))
    return raw, tr, te


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, *a, **k):
    """(result, (wall seconds, CPU seconds of this process)). The CPU seconds are what the 2
    shared cores distort least: other jobs inflate the wall time of both sides of a ratio
    unevenly; with one torch thread (``--threads 1``) the CPU time is the work done."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **k)
    sync()
    return out, np.array([time.perf_counter() - t0, time.process_time() - c0])


def one_seed(s, args, params, settings, model_cfg, add, extra):
    """One request on seed ``s``; appends its rows through ``add``. Returns (|D|, |F|)."""
    t, fk, u = params.train, params.fisher, params.unlearn
    raw, tr, te = load(args.dataset, args.max_train, s, args.max_test)
    rng = np.random.default_rng(s)
    f_idx = np.sort(rng.choice(tr, int(round(args.fraction * len(tr))), replace=False))
    r_idx = np.setdiff1d(tr, f_idx)
    T = lambda idx: (torch.from_numpy(raw.X[idx]), torch.from_numpy(raw.y[idx]))  # noqa: E731
    (fX, fy), (rX, ry), (teX, tey), (dX, dy) = T(f_idx), T(r_idx), T(te), T(tr)
    ids = lambda idx: [str(i) for i in raw.ids[idx]]  # noqa: E731
    shape = raw.X.shape[1:]
    factory = lambda seed: build_model(model_cfg, shape, raw.n_classes, seed)  # noqa: E731
    dev = DEVICE
    original = fit(factory(s), dX, dy, settings, s, device=dev)
    oracle, retrain = timed(fit, factory(s + 100), rX, ry, settings, s + 100, device=dev)
    splits = EvalSplits(fX, fy, rX, ry, teX, tey)
    add("original", original, None, retrain, splits, s)
    add("retrain (oracle)", oracle, retrain, retrain, splits, s)
    opts = {"kind": fk.kind, "batch_size": fk.batch_size, "seed": fk.seed}

    # amortised: Σ_D once (not per request); per request Σ_F and one subtraction
    (full, n), full_t = timed(
        fisher_diagonal_sum,
        original,
        dX,
        dy,
        **opts,
        sample_ids=ids(tr),
        sum_dtype=torch.float64,
    )

    def request_stats():
        sf, nf = fisher_diagonal_sum(
            original, fX, fy, **opts, sample_ids=ids(f_idx), sum_dtype=torch.float64
        )
        i_f = {k: (v / nf).float() for k, v in sf.items()}
        return i_f, {k: v.float() for k, v in retain_from_full(full, n, sf, nf).items()}

    (IF_a, IR_a), amort_t = timed(request_stats)
    stats = {"amortised": (IF_a, IR_a, amort_t)}
    if not args.skip_today:
        # today: I_F and I_R over R, per request
        (IF, IR), today_t = timed(
            lambda: (
                fisher_diagonal(original, fX, fy, **opts, sample_ids=ids(f_idx)),
                fisher_diagonal(original, rX, ry, **opts, sample_ids=ids(r_idx)),
            )
        )
        err = max(float(((IR_a[k] - IR[k]).abs() / (IR[k].abs().max() + 1e-30)).max()) for k in IR)
        stats["today"] = (IF, IR, today_t)
        extra.setdefault("today_stats_s", []).append(today_t[0])
        extra.setdefault("derived_IR_max_rel_err", []).append(err)
        extra.setdefault("break_even_requests", []).append(full_t[0] / (today_t[0] - amort_t[0]))
        # batch_squared, per request (SSD's importance)
        bopts = {**opts, "kind": "batch_squared"}
        (IF_b, IR_b), b_t = timed(
            lambda: (
                fisher_diagonal(original, fX, fy, **bopts),
                fisher_diagonal(original, rX, ry, **bopts),
            )
        )
        stats["batch_squared"] = (IF_b, IR_b, b_t)
        extra.setdefault("batch_squared_stats_s", []).append(b_t[0])
    extra.setdefault("retrain_s", []).append(retrain[0])
    extra.setdefault("retrain_cpu_s", []).append(retrain[1])
    extra.setdefault("full_sums_s", []).append(full_t[0])
    extra.setdefault("full_sums_cpu_s", []).append(full_t[1])
    extra.setdefault("amortised_request_stats_s", []).append(amort_t[0])

    fd = u.fisher_diagonal
    variants = [
        ("ssd", u.ssd, "today"),
        ("ssd", u.ssd, "amortised"),
        ("ssd", u.ssd, "batch_squared"),
        ("fisher_forgetting", u.fisher_forgetting, "today"),
        ("fisher_forgetting", u.fisher_forgetting, "amortised"),
        ("fisher_diagonal", replace(fd, retain_sample_multiple=None), "today"),
        ("fisher_diagonal", replace(fd, retain_sample_multiple=None), "amortised"),
    ]
    for spec in args.fd_variant:
        changes = {}
        for kv in spec.split(","):
            key, value = kv.split("=")
            changes[key] = type(getattr(fd, key) or 1.0)(value)
        variants.append(("fisher_diagonal", replace(fd, **changes), "amortised"))
    for name, mparams, source in variants:
        if source not in stats:
            continue
        i_f, i_r, stats_t = stats[source]
        inputs = UnlearnInputs(fX, fy, rX, ry, factory, t, i_f, i_r, device=dev)
        method = get_method(name)
        (model, _), m_t = timed(method.fn, copy.deepcopy(original), inputs, mparams, s)
        label = f"{name} [{source}"
        if name == "fisher_diagonal":
            label += "".join(
                f", {k}={getattr(mparams, k)}"
                for k in ("retain_sample_multiple", "epochs", "lr", "batch_size")
                if getattr(mparams, k) != getattr(fd, k) or k == "retain_sample_multiple"
            )
        add(label + "]", model, stats_t + m_t, retrain, splits, s)

    # dmm's per-request step: the targets Σ_F β from the store's precomputed ridge factor
    # (timed on a store of the real shape: M models over D, P = (1 + k)|F| points; the values
    # of masks and outputs do not change the cost), then the matching fine-tuning (the same
    # code and cost as oracle_matching, whose targets here are the oracle's logits: the
    # quality shown is oracle matching's, not dmm's)
    from pipeline_lib.attribution.datamodels import forget_shift_direct, ridge_factor
    from pipeline_lib.attribution.matching import MatchTargets, matching_retain_rows

    dm = u.dmm
    rows = matching_retain_rows(len(f_idx), len(r_idx), dm.retain_multiple, s)
    mX = torch.cat([fX, rX[rows]])
    gen = np.random.default_rng(s)
    masks = gen.random((args.store_models, len(tr))) < params.attribution.alpha
    outs = gen.standard_normal((args.store_models, len(mX), raw.n_classes)).astype(np.float32)
    factor = ridge_factor(masks, params.attribution.lam)  # once per store
    pos = np.searchsorted(tr, f_idx)
    _, target_t = timed(
        forget_shift_direct, masks, outs, pos, params.attribution.lam, factor=factor
    )
    with torch.no_grad():
        logits = oracle.eval()(mX.to(dev)).cpu()
    match = MatchTargets(mX, logits.float(), len(f_idx), "oracles")
    inputs = UnlearnInputs(fX, fy, rX, ry, factory, t, match=match, device=dev)
    om = replace(
        u.oracle_matching,
        **{
            k: getattr(dm, k)
            for k in ("epochs", "lr", "batch_size", "lr_decay", "retain_multiple", "weight_reg")
        },
    )
    (model, _), m_t = timed(
        get_method("oracle_matching").fn, copy.deepcopy(original), inputs, om, s
    )
    add("dmm [request step; quality: oracle targets]", model, target_t + m_t, retrain, splits, s)

    # svd_projection on a class request (class 0: all its samples in D), per-class samples
    # (its retain activations are 100 per class, not R: nothing to amortise); ratio against
    # this seed's retraining time scaled by |R_class| / |R| (retraining is linear in |R|)
    c_f = tr[raw.y[tr] == 0]
    c_r = np.setdiff1d(tr, c_f)
    (cfX, cfy), (crX, cry) = T(c_f), T(c_r)
    inputs = UnlearnInputs(cfX, cfy, crX, cry, factory, t, forget_classes=(0,), device=dev)
    (model, _), svd_t = timed(
        get_method("svd_projection").fn, copy.deepcopy(original), inputs, u.svd_projection, s
    )
    scaled = retrain * len(c_r) / len(r_idx)
    c_splits = EvalSplits(cfX, cfy, crX, cry, teX, tey)
    add("svd_projection [class 0 request]", model, svd_t, scaled, c_splits, s)
    print(
        f"seed {s}: retrain {retrain[0]:.2f}s (cpu {retrain[1]:.2f}s), full sums "
        f"{full_t[0]:.2f}s, per-request stats {amort_t[0]:.3f}s",
        file=sys.stderr,
        flush=True,
    )
    return len(tr), len(f_idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="digits", choices=("digits", "fashion-mnist"))
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument(
        "--max-test",
        type=int,
        default=None,
        help="seeded test subsample (default: --max-train / 4); the MIA's SVC grows with it",
    )
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: params)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument(
        "--skip-today",
        action="store_true",
        help="leave out the per-request I_R over R (and batch_squared): at 60k its cost is Σ_D's",
    )
    ap.add_argument(
        "--fd-variant",
        action="append",
        default=[],
        help="extra fisher_diagonal row (amortised statistics), e.g. retain_sample_multiple=3,epochs=5",
    )
    ap.add_argument("--store-models", type=int, default=256, help="M of dmm's timed store")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads; 1 makes the CPU-time columns exact on a shared machine (with 2, "
        "a thread that waits for a descheduled peer spins and its CPU time counts)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (see the docstring)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("benchmarks.request_cost: --device cuda but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    params = Params()
    t = params.train
    epochs = args.epochs or t.epochs
    settings = FitSettings(epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.momentum)
    model_cfg = ModelConfig(name=args.model) if args.model != params.model.name else params.model
    rows: dict[str, list[dict[str, float]]] = {}
    extra: dict[str, list[float]] = {}

    def add(label: str, model, secs, retrain, splits, s: int) -> None:
        ev = params.evaluate
        m = evaluate_model(copy.deepcopy(model).cpu(), splits, ev.mia_svc_c, ev.mia_folds, s)
        if secs is None:
            secs = np.full(2, np.nan)
        r = secs / retrain
        row = {**m, "seconds": secs[0], "ratio": r[0], "cpu_s": secs[1], "cpu_ratio": r[1]}
        rows.setdefault(label, []).append(row)

    for s in range(args.seeds):
        n_tr, n_f = one_seed(s, args, params, settings, model_cfg, add, extra)
    flags = "".join(f" --fd-variant {v}" for v in args.fd_variant)
    flags += " --skip-today" if args.skip_today else ""
    flags += f" --threads {args.threads} --store-models {args.store_models}"
    if DEVICE.type == "cuda":
        flags += f" --device cuda  ({torch.cuda.get_device_name(DEVICE)})"
    print(
        f"python -m benchmarks.request_cost --dataset {args.dataset} --model {args.model} "
        f"--max-train {args.max_train} --max-test {args.max_test} --fraction {args.fraction} --epochs {epochs} "
        f"--seeds {args.seeds}{flags}  (|D|={n_tr}, |F|={n_f}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})"
    )
    cols = ("forget_acc", "TA", "MIA_efficacy", "seconds", "ratio", "cpu_s", "cpu_ratio")
    print(f"| {'row':<44} | " + " | ".join(f"{c:>15}" for c in cols) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for label, rs in rows.items():
        cells = []
        for c in cols:
            v = np.array([r[c] for r in rs])
            d = 4 if "ratio" in c else 2
            cells.append(f"{v.mean():.{d}f} ± {v.std():.{d}f}")
        print(f"| {label:<44} | " + " | ".join(f"{x:>15}" for x in cells) + " |")
    print()
    for k, v in extra.items():
        print(f"{k}: {np.mean(v):.4g} (per seed: {', '.join(f'{x:.4g}' for x in v)})")


if __name__ == "__main__":
    main()
