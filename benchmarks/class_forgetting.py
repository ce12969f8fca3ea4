"""Fashion-MNIST class forgetting: each class forgotten in turn, for the MLP, the CNN and the
ViT, with svd_projection, mnemonic_code, ssd, fisher_diagonal, fisher_forgetting and retrain.

    python -m benchmarks.class_forgetting --models mlp,cnn --classes 0-9 --max-train 5000

A seeded subsample of the official training split (``--max-train``) and of the test split
(``--max-test``). One original model per architecture, trained with mnemonic codes mixed in
(t_mix = ``--t-mix``, the paper's 0.1 for MNIST-like data) so that mnemonic_code can run; every
method unlearns that same original. For each forgotten class c: F = the training samples of
c, R = the rest; the oracle is retrained on R from scratch (same settings, no codes).

Columns (percent, mean ± std over the forgotten classes):
- forget: accuracy on the *test* samples of the forgotten class (papers' "forget accuracy");
- RA: accuracy on R; TA_r: test accuracy on the retained classes;
- MIA: SalUn's MIA-efficacy on F (members: R, non-members: the retained classes' test samples);
- time/retrain: the method's wall time (Fisher statistics included for the methods that read
  them) ÷ the oracle's training time, measured in the same process.

All methods run with their ``params.yaml`` defaults except where ``--set`` style flags below
say otherwise; Fisher statistics use ``fisher.kind`` (true_expected) with I_R on a seeded
``--fisher-retain`` subsample of R.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks._common import load_split
from pipeline_lib.config import ModelConfig, Params, build_params
from pipeline_lib.evaluation.metrics import accuracy, confidence, mia_efficacy
from pipeline_lib.methods import UnlearnInputs, get_method
from pipeline_lib.methods.mnemonic import CodeMixer, mnemonic_codes
from pipeline_lib.models.image import build_model
from pipeline_lib.stats.fisher import fisher_diagonal
from pipeline_lib.training.fit import FitSettings, fit, predict_logits

METHODS = ("svd_projection", "mnemonic_code", "ssd", "fisher_diagonal", "fisher_forgetting")
FISHER_METHODS = {"ssd", "fisher_diagonal", "fisher_forgetting"}
SHAPE = (1, 28, 28)


def parse_classes(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def subsample(X: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    rows = np.sort(np.random.default_rng(seed).choice(len(y), min(n, len(y)), replace=False))
    return torch.from_numpy(X[rows].astype(np.float32)), torch.from_numpy(y[rows].astype(np.int64))


def metrics(model, F, R, Te, c: int, params: Params) -> dict[str, float]:
    (fX, fy), (rX, ry), (tX, ty) = F, R, Te
    tf, tr = ty == c, ty != c
    lf, lr, lt = predict_logits(model, fX), predict_logits(model, rX), predict_logits(model, tX)
    return {
        "forget": accuracy(lt[tf], ty[tf]),
        "forget_train": accuracy(lf, fy),
        "RA": accuracy(lr, ry),
        "TA_r": accuracy(lt[tr], ty[tr]),
        "MIA": mia_efficacy(
            confidence(lr, ry),
            confidence(lt[tr], ty[tr]),
            confidence(lf, fy),
            params.evaluate.mia_svc_c,
            params.evaluate.seed,
        ),
    }


def run_model(name: str, args, data, params: Params) -> dict:
    Xtr, ytr, Xte, yte = data
    cfg = {
        "mlp": ModelConfig(name="mlp", hidden=(128, 128)),
        "cnn": ModelConfig(name="cnn", channels=(16, 32)),
        "vit": ModelConfig(name="vit"),
    }[name]
    settings = FitSettings(args.epochs, 64, 1e-3)
    codes = mnemonic_codes(SHAPE, 10, 0)
    original = build_model(cfg, SHAPE, 10, seed=0)
    t0 = time.perf_counter()
    fit(original, Xtr, ytr, settings, 0, batch_transform=CodeMixer(codes, args.t_mix, 0))
    train_s = time.perf_counter() - t0
    print(f"[{name}] original trained in {train_s:.1f}s", file=sys.stderr, flush=True)
    methods = args.methods
    rows: dict[str, list[dict]] = {m: [] for m in ("original", "retrain", *methods)}
    for c in args.classes:
        f = ytr == c
        F, R = (Xtr[f], ytr[f]), (Xtr[~f], ytr[~f])
        oracle = build_model(cfg, SHAPE, 10, seed=1)
        t0 = time.perf_counter()
        fit(oracle, *R, settings, 1)
        retrain_s = time.perf_counter() - t0
        rows["original"].append({**metrics(original, F, R, (Xte, yte), c, params), "ratio": 0.0})
        rows["retrain"].append({**metrics(oracle, F, R, (Xte, yte), c, params), "ratio": 1.0})
        t0 = time.perf_counter()
        i_f = i_r = None
        if FISHER_METHODS & set(methods):
            rng = np.random.default_rng(c)
            sub = torch.from_numpy(
                np.sort(rng.choice(len(R[1]), args.fisher_retain, replace=False))
            )
            kind = params.fisher.kind
            i_f = fisher_diagonal(original, *F, kind=kind, batch_size=256)
            i_r = fisher_diagonal(original, R[0][sub], R[1][sub], kind=kind, batch_size=256)
        fisher_s = time.perf_counter() - t0
        for m in methods:
            method = get_method(m)
            empty = (torch.empty((0, *SHAPE)), torch.empty(0, dtype=torch.int64))
            fx = F if method.needs_data else empty
            rx = R if method.needs_data else empty
            inputs = UnlearnInputs(
                *fx,
                *rx,
                model_factory=lambda s, cfg=cfg: build_model(cfg, SHAPE, 10, s),
                train=params.train,
                fisher_forget=i_f if m in FISHER_METHODS else None,
                fisher_retain=i_r if m in FISHER_METHODS else None,
                forget_classes=(c,),
                mnemonic_codes=codes,
            )
            t0 = time.perf_counter()
            out, _ = method.fn(copy.deepcopy(original), inputs, params.unlearn.method_params(m), 0)
            seconds = time.perf_counter() - t0 + (fisher_s if m in FISHER_METHODS else 0.0)
            rows[m].append(
                {**metrics(out, F, R, (Xte, yte), c, params), "ratio": seconds / retrain_s}
            )
        print(
            f"[{name}] class {c}: retrain {retrain_s:.1f}s, fisher {fisher_s:.1f}s; "
            + ", ".join(f"{m} forget {rows[m][-1]['forget']:.1f}" for m in methods),
            file=sys.stderr,
            flush=True,
        )
    return {"train_seconds": train_s, "rows": rows}


def table(name: str, result: dict, n_classes: int) -> str:
    cols = ("forget", "RA", "TA_r", "MIA", "ratio")
    head = f"| {name} ({n_classes} classes) | forget-class acc | RA | TA (retained classes) | MIA-efficacy | time ÷ retrain |"
    lines = [head, "|---|---|---|---|---|---|"]
    for m, rows in result["rows"].items():
        cells = []
        for k in cols:
            v = np.array([r[k] for r in rows])
            if k == "ratio":
                cells.append("—" if m == "original" else f"{v.mean():.4f}")
            else:
                cells.append(f"{v.mean():.1f} ± {v.std():.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--classes", type=parse_classes, default=list(range(10)))
    ap.add_argument("--max-train", type=int, default=5000)
    ap.add_argument("--max-test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--t-mix", type=float, default=0.1)
    ap.add_argument("--fisher-retain", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--methods",
        type=lambda t: t.split(","),
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (retrain always runs)",
    )
    ap.add_argument("--json", help="also write the raw rows here")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml default, e.g. unlearn.svd_projection.alpha_f=10",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    Xtr, ytr, Xall, yall, _, split = load_split("fashion-mnist")
    test = split == "test"
    data = (
        *subsample(Xtr, ytr, args.max_train, 0),
        *subsample(Xall[test], yall[test], args.max_test, 1),
    )
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    params = build_params({}, overrides)
    print(
        f"Fashion-MNIST: {len(data[1])} train / {len(data[3])} test samples, epochs {args.epochs}, "
        f"t_mix {args.t_mix}, torch threads {args.threads}, overrides {overrides or 'none'}"
    )
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args, data, params)
        print(f"\n{table(name, results[name], len(args.classes))}\n", flush=True)
        print(f"original trained in {results[name]['train_seconds']:.1f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
