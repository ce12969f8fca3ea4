"""Tiny GPT-2 on the Shakespeare corpus, forgetting one play: first-epoch gradient ascent and
its variants side by side with the retrained oracle (issue 6; algorithms.md §3).

    python -m benchmarks.lm_ascent [--params params-lm.yaml] [--play macbeth] [--set KEY=VALUE ...]

One process trains the original (every training scene) and the oracle (without the play's
training scenes) with ``params-lm.yaml``; every variant then unlearns the same original in
a fresh spawned subprocess (so its peak RSS increase is its own) and is evaluated like the
pipeline does. Columns: forget perplexity and its relative gap to the oracle's, held-out
perplexity change vs the original, loss-MIA AUC (forget vs held-out), verbatim memorisation
rate, unlearning time ÷ oracle training time, gradient+optimiser-state bytes of the moving
weights, and the subprocess's peak-RSS increase during unlearning.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pipeline_lib.config import to_dict
from pipeline_lib.config.text import build_lm_params, read_params_file
from pipeline_lib.data.requests import parse_request, write_manifests
from pipeline_lib.data.text import extract_forget_docs, load_corpus, prepare_corpus

GA = "unlearn.gradient_ascent."
VARIANTS: dict[str, dict] = {
    "GA 1 epoch, embedding, calibrated (stop, held-out target) [default]": {},
    "GA 1 epoch, embedding, calibrated (scale)": {GA + "calibration": "scale"},
    "GA 5 epochs, embedding, calibrated (scale)": {GA + "calibration": "scale", GA + "epochs": 5},
    "GA 1 epoch, embedding, uncalibrated": {GA + "calibration": "none"},
    "GA 5 epochs, embedding, uncalibrated": {GA + "calibration": "none", GA + "epochs": 5},
    "GA 1 epoch, all params, calibrated (stop)": {GA + "parameters": "all"},
    "GA 1 epoch, all params, uncalibrated": {GA + "parameters": "all", GA + "calibration": "none"},
    "GA 1 epoch, last block, calibrated (stop)": {GA + "parameters": "blocks", GA + "blocks": [-1]},
    "GA 1 epoch, embedding, calibrated (stop, oracle target)": {GA + "target": "oracle"},
    "GA 1 epoch, embedding, calibrated (stop, held-out-of-play target)": {
        GA + "target": "heldout_group"
    },
    "NegGrad+ 1 epoch, all params": {"unlearn.method": "neggrad_plus"},
}


def _child(args: tuple) -> dict:
    """Unlearn + evaluate one variant in a fresh process; returns metrics and peak RSS."""
    raw, overrides, prep, man, orig, oracle, out = args
    from pipeline_lib.modalities import text as lm_steps

    p = build_lm_params(raw, overrides)
    torch.set_num_threads(p.train.threads or 1)
    sp = lm_steps.load_text_splits(prep, man)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model_path = lm_steps.load_lm(orig, p.lm)  # warm the imports/allocator like the method will
    del model_path
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = lm_steps.lm_unlearn_step(
        sp, orig, p.lm, p.train, p.unlearn, out, oracle, p.evaluate.batch_size
    )
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = lm_steps.lm_metrics(lm_steps.load_lm(r["path"], p.lm), sp, p)
    return {**m, "seconds": r["seconds"], "info": r["info"], "rss_kib": rss2 - max(rss0, rss1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params-lm.yaml")
    ap.add_argument("--play", default="macbeth")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", help="substring: run only matching variants")
    ap.add_argument(
        "--work",
        help="work folder; an original and oracle trained there earlier with the same "
        "parameters (trained.json) are reused instead of retrained",
    )
    args = ap.parse_args()
    raw = read_params_file(args.params)
    base = {k.strip(): yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    from pipeline_lib.modalities import text as lm_steps

    p = build_lm_params(raw, base)
    torch.set_num_threads(p.train.threads or 1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lm-bench-"))
    prep, man, art = str(work / "prep"), str(work / "forget"), str(work / "art")
    prepare_corpus(p.text, prep)
    corpus = load_corpus(prep)
    req = parse_request(
        {"request_id": "bench", "reason": "benchmark", "forget": {"groups": [args.play]}}
    )
    f, r = extract_forget_docs(req, corpus)
    write_manifests(man, req, f, r, corpus.meta)
    print(
        f"corpus: {corpus.meta['n_train']} train / {corpus.meta['n_test']} held-out documents "
        f"({corpus.meta['n_chars']} chars); forget {len(f)} training scenes of {args.play}; "
        f"model {p.lm}",
        flush=True,
    )
    key = json.dumps([to_dict(p.text), to_dict(p.lm), to_dict(p.train), args.play], sort_keys=True)
    cache = work / "trained.json"
    if cache.is_file() and json.loads(cache.read_text())["key"] == key:
        orig, oracle = (json.loads(cache.read_text())[k] for k in ("original", "oracle"))
        print("reusing the original and oracle trained earlier in", work)
    else:
        orig = lm_steps.lm_train_step(prep, None, "original", p.lm, p.train, p.train.seed, art)
        oracle = lm_steps.lm_train_step(
            prep, man, "oracle", p.lm, p.train, p.train.oracle_seed, art
        )
        cache.write_text(json.dumps({"key": key, "original": orig, "oracle": oracle}))
    print(
        f"original trained in {orig['seconds']:.1f}s, oracle in {oracle['seconds']:.1f}s",
        flush=True,
    )
    sp = lm_steps.load_text_splits(prep, man)
    ref = {
        name: lm_steps.lm_metrics(lm_steps.load_lm(path, p.lm), sp, p)
        for name, path in (("original", orig["path"]), ("oracle", oracle["path"]))
    }
    rows = {}
    ctx = mp.get_context("spawn")
    for name, ov in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        ov = {**base, **ov}
        if ov.get(GA + "blocks") == [-1]:
            depth = len(lm_steps.lm.block_modules(lm_steps.load_lm(orig["path"], p.lm)))
            ov[GA + "blocks"] = [depth - 1]
        t0 = time.perf_counter()
        with ctx.Pool(1) as pool:
            rows[name] = pool.apply(
                _child, ((raw, ov, prep, man, orig["path"], oracle["path"], art),)
            )
        print(f"  {name}: done in {time.perf_counter() - t0:.1f}s", flush=True)
    o, base_m = ref["oracle"], ref["original"]

    def line(name: str, m: dict, secs: float | None, info: dict | None, rss: float | None) -> str:
        gap = 100 * (m["ppl_forget"] - o["ppl_forget"]) / o["ppl_forget"]
        held = 100 * (m["ppl_heldout"] - base_m["ppl_heldout"]) / base_m["ppl_heldout"]
        ratio = f"{secs / oracle['seconds']:.4f}" if secs is not None else "1"
        state = f"{info['trainable_state_bytes'] / 1024:.0f}" if info else "-"
        rss_s = f"{rss / 1024:.1f}" if rss is not None else "-"
        return (
            f"| {name} | {m['ppl_forget']:.4g} | {gap:+.4g}% | {m['ppl_heldout']:.4g} | {held:+.4g}% | "
            f"{m['ppl_retain']:.4g} | {m['loss_MIA_AUC']:.3f} | {m['memorization_rate']:.3f} | "
            f"{m['memorization_token_acc']:.3f} | {ratio} | {state} | {rss_s} |"
        )

    print()
    print(
        "| model | forget ppl | gap to oracle | held-out ppl | held-out change | retain ppl | "
        "MIA AUC | memorised | token match | time ÷ retrain | grad+opt state KiB | peak RSS +MiB |"
    )
    print("|---" * 12 + "|")
    print(line("original", base_m, None, None, None).replace("| 1 |", "| - |"))
    print(line("oracle (retrain)", o, oracle["seconds"], None, None))
    for name, m in rows.items():
        print(line(name, m, m["seconds"], m["info"], m["rss_kib"]))
    print()
    for name, m in rows.items():
        info = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m["info"].items()}
        print(f"{name}: {json.dumps(info)}")


if __name__ == "__main__":
    main()
