"""Peak memory of one epoch of gradient ascent: embedding-only vs all parameters, on a GPT-2
large enough for the difference to show in the process's peak RSS.

    python -m benchmarks.lm_memory [--n-layer 6] [--n-embd 384] [--optimizer sgd|adam]

Each configuration runs in a fresh spawned process: build the model (random init: memory
does not depend on training), cut the forget documents (Macbeth's scenes) into windows,
record the peak RSS, run one uncalibrated epoch of ascent (so both variants take exactly the
same steps), record the peak RSS again. Prints the increase, the exact gradient +
optimiser-state bytes of the moving weights, and seconds per step.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time


def _child(n_layer: int, n_embd: int, parameters: str, optimizer: str, ctx_len: int) -> dict:
    import torch

    from pipeline_lib.data.text import TextConfig, load_shakespeare
    from pipeline_lib.methods.text import GradientAscentParams, LMUnlearnInputs, gradient_ascent
    from pipeline_lib.models import lm
    from pipeline_lib.models.lm import LMModelConfig, LMTrainConfig

    torch.set_num_threads(1)
    raw = load_shakespeare(TextConfig(plays=("macbeth",)))
    texts = [t[:1000] for t in raw.texts]
    cfg = LMModelConfig(
        n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=ctx_len
    )
    model = lm.build_lm(cfg, 0)
    win = lm.make_windows(texts, ctx_len)
    inputs = LMUnlearnInputs(win, win, win, None, lambda s: lm.build_lm(cfg, s), LMTrainConfig())
    p = GradientAscentParams(
        calibration="none", parameters=parameters, optimizer=optimizer, lr=1e-4, batch_size=8
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _, info = gradient_ascent(model, inputs, p, 0)
    secs = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_params = sum(x.numel() for x in model.parameters())
    return {
        "n_params": n_params,
        "moved": info["n_params_moved"],
        "state_mib": info["trainable_state_bytes"] / 2**20,
        "rss_increase_mib": (after - before) / 1024,
        "sec_per_step": secs / max(1, info["steps"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = {}
    for parameters in ("embedding", "all"):
        with ctx.Pool(1) as pool:
            rows[parameters] = pool.apply(
                _child, (args.n_layer, args.n_embd, parameters, args.optimizer, args.context)
            )
    n = rows["all"]["n_params"]
    print(
        f"GPT-2 {args.n_layer} layers x {args.n_embd}, {n / 1e6:.2f}M parameters, context "
        f"{args.context}, optimizer {args.optimizer}, one epoch of ascent on Macbeth"
    )
    print(
        "| parameters | moving weights | grad+optimiser state MiB | peak RSS increase MiB | s/step |"
    )
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['moved'] / 1e6:.2f}M | {r['state_mib']:.1f} | "
            f"{r['rss_increase_mib']:.1f} | {r['sec_per_step']:.3f} |"
        )
    e, a = rows["embedding"], rows["all"]
    print(
        f"embedding ÷ all: state {e['state_mib'] / a['state_mib']:.3f}, peak RSS increase "
        f"{e['rss_increase_mib'] / max(a['rss_increase_mib'], 1e-9):.3f}, time per step "
        f"{e['sec_per_step'] / a['sec_per_step']:.3f}"
    )


if __name__ == "__main__":
    main()
