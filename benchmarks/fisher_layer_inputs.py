"""The layer-wise Fisher sums with each layer's input term formed once per batch (now) against
once per class (before), side by side in one process, on real data (issue 15).

    python -m benchmarks.fisher_layer_inputs --dataset fashion-mnist --model cnn --n 2000
    python -m benchmarks.fisher_layer_inputs --dataset digits --model mlp --n 1438

``true_expected`` takes one backward pass per class; the input term of a layer (the unfolded
patches of a Conv2d, a² of a Linear) does not depend on the class. *per class* rebuilds it in
every pass, as the code did before; *per batch* is the code now. Both run the same
:func:`pipeline_lib.stats.fisher.fisher_diagonal_sum` (float64 sums, batch 256) on an untrained
model of the pipeline's architecture (the cost does not depend on the weights); the table
gives the thread CPU seconds (one torch thread; best of ``--repeats``) and whether the sums
are bit-identical.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pipeline_lib.config import DataConfig, ModelConfig
from pipeline_lib.data.images import assign_split, load_digits_source, load_fashion_mnist_source
from pipeline_lib.models.image import build_model
from pipeline_lib.stats import fisher


def _per_class(run):
    """Run ``run`` with the input term rebuilt in every class's pass (the previous code)."""
    layer_input, add_layer = fisher._layer_input, fisher._add_layer

    def add_rebuilding(sums, name, m, a, d, w):
        add_layer(sums, name, m, layer_input(m, a), d, w)

    fisher._layer_input = lambda m, a: a
    fisher._add_layer = add_rebuilding
    try:
        return run()
    finally:
        fisher._layer_input, fisher._add_layer = layer_input, add_layer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="fashion-mnist")
    ap.add_argument("--model", choices=("mlp", "cnn"), default="cnn")
    ap.add_argument("--n", type=int, default=2000, help="training images (seeded subsample)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = DataConfig(name=args.dataset, seed=0)
    raw = (load_digits_source if args.dataset == "digits" else load_fashion_mnist_source)(cfg)
    train = np.flatnonzero(assign_split(raw, cfg) == "train")
    rows = np.sort(np.random.default_rng(0).choice(train, min(args.n, len(train)), replace=False))
    X, y = torch.from_numpy(raw.X[rows]), torch.from_numpy(raw.y[rows])
    model = build_model(ModelConfig(name=args.model), raw.X.shape[1:], raw.n_classes, seed=0)

    def run():
        return fisher.fisher_diagonal_sum(
            model, X, y, "true_expected", batch_size=256, sum_dtype=torch.float64
        )[0]

    results, seconds = {}, {}
    for label, call in (("per class (before)", lambda: _per_class(run)), ("per batch", run)):
        best = float("inf")
        for _ in range(args.repeats):
            c0 = time.thread_time()
            results[label] = call()
            best = min(best, time.thread_time() - c0)
        seconds[label] = best
    before, now = results.values()
    same = all(torch.equal(before[k], now[k]) for k in before)
    print(
        f"python -m benchmarks.fisher_layer_inputs --dataset {args.dataset} --model {args.model} "
        f"--n {len(rows)} --repeats {args.repeats}  (torch {torch.__version__}, 1 thread, "
        f"load {os.getloadavg()[0]:.1f})"
    )
    print("| input term | CPU s | ÷ per class |\n|---|---|---|")
    base = seconds["per class (before)"]
    for label, s in seconds.items():
        print(f"| {label} | {s:.3f} | {s / base:.2f} |")
    print(f"sums bit-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
