"""The two ridge systems of DM-Direct side by side: dual (AAᵀ + λI_M) and primal
(AᵀA + λI_N), for store sizes M around and above the number of training points N.

    python -m benchmarks.ridge_forms --n-train 1437 --models 1000,2000,8000,16000

For each M: exactly-αN subset masks (as the attribution store draws them) and random float32
outputs on P = 4·|F| matching points × C classes (the shape of a digits 10% request's
targets; the values do not change the cost). Prints, per form, the seconds and bytes of the
request-independent factor (what a store caches) and the seconds of one request's Σ_F β from
it, then the ratio dual ÷ primal and the largest difference between the two shifts relative
to their scale. The pipeline takes the smaller system (`datamodels.ridge_form`: primal when
M > N). Timings are wall seconds on whatever this machine is doing: run it idle.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline_lib.attribution.datamodels import forget_shift_direct, ridge_factor, ridge_form


def _masks(rng: np.random.Generator, m: int, n: int, alpha: float) -> np.ndarray:
    k = int(round(alpha * n))
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, size=k, replace=False)] = True
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=1437, help="N (digits train split: 1437)")
    ap.add_argument("--models", default="1000,2000,8000,16000", help="comma-separated M")
    ap.add_argument("--forget", type=int, default=144, help="|F| (digits 10%%: 144)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lam", type=float, default=100.0)
    ap.add_argument("--forms", default="dual,primal", help="which forms to time")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(m) for m in args.models.split(",") if m]
    forms = [f for f in args.forms.split(",") if f]
    for f in forms:
        if f not in ("dual", "primal"):
            raise SystemExit(f"--forms: unknown form {f!r}; valid: dual, primal")
    n = args.n_train
    rng = np.random.default_rng(args.seed)
    forget = np.sort(rng.choice(n, size=args.forget, replace=False))
    points = 4 * args.forget

    print(f"N = {n}, |F| = {args.forget}, outputs {points} x {args.classes}, lambda = {args.lam}")
    print(
        "| M | pipeline's form | form | factor s | factor MB | request s | "
        "factor s dual/primal | request s dual/primal | max |shift diff| / max |shift| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in sizes:
        masks = _masks(rng, m, n, args.alpha)
        outs = rng.standard_normal((m, points, args.classes)).astype(np.float32)
        got: dict[str, tuple[float, float, float, np.ndarray]] = {}
        for form in forms:
            t0 = time.perf_counter()
            factor = ridge_factor(masks, args.lam, form=form)
            t1 = time.perf_counter()
            shift = forget_shift_direct(masks, outs, forget, args.lam, factor=factor)
            t2 = time.perf_counter()
            got[form] = (t1 - t0, factor.nbytes / 1e6, t2 - t1, shift)
            del factor
        ratio_f = ratio_r = diff = "-"
        if len(got) == 2:
            (fd, _, rd, sd), (fp, _, rp, sp) = got["dual"], got["primal"]
            ratio_f, ratio_r = f"{fd / fp:.1f}x", f"{rd / rp:.1f}x"
            diff = f"{np.abs(sd - sp).max() / np.abs(sp).max():.1e}"
        for form, (fs, mb, rs, _) in got.items():
            print(
                f"| {m} | {ridge_form(m, n)} | {form} | {fs:.2f} | {mb:.0f} | {rs:.3f} | "
                f"{ratio_f} | {ratio_r} | {diff} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
