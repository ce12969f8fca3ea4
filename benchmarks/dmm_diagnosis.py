"""What limits DMM at N = 100 on digits (issue 16): target quality, then the matching step.

    python -m benchmarks.dmm_diagnosis --workdir /tmp/bench-n100 --subset-models 400,1000 \
        --lams 1,100,300 --anchor --requests val-10,heldout-10,heldout-1 --k 20 \
        --epochs 10 --lr 2e-3 --batch 128 --tune-only "dmm M=1000 lam=100 anchored;ideal shift"

Uses the scratch project of :mod:`benchmarks.quality_n100` (the same params, requests and
stores: N originals, N oracles per request, M subset models, OM's own 10 oracles; any store
that is missing is trained through the engine first). For each request:

1. **Target quality.** The matching points (all of F, then ``retain_multiple``·|F| seeded
   retain points, as :func:`tasks.evaluation.matching_targets_for` draws them) and, for the
   first ``--k`` originals, the targets each method would fine-tune toward. The *targets
   themselves* are scored as if they were a model's outputs: KLoM of their margins against
   the N oracles' margins on the forget and on the retain matching points. Rows:
   ``none`` (the original's own logits), ``dmm M=… [lam=…]`` (DM-Direct f − Σ_F β at each M
   and ridge penalty, plain; with ``--anchor`` also ``… anchored``, the full-model anchor of
   :func:`pipeline_lib.attribution.matching.full_model_anchor`; and
   ``… anchored (originals' mean)``, the anchor from the mean of the k originals so each
   target keeps its original's whole seed deviation; ``--m-direct``: ``… anchored m=…``,
   DM-Direct's multiplier f_θ − m·Σ_F β, the paper's m = 1),
   ``ideal shift`` (f_k + mean(oracles) − mean(originals): the best any per-request shift
   shared by all originals can do, i.e. DM-Direct with exact expected attribution), ``om``
   (the mean logits of OM's 10 oracles, the same for every original). Also the Pearson
   correlation of DMM's margin shift with the true mean shift on F, and its mean; and the
   U-LiRA AUC of the targets at F against the oracles (as if the k target sets were k
   unlearned models: what fine-tuning exactly onto them would score).
2. **The matching step.** The target sets named in ``--tune-only`` (all but ``none`` when
   empty) are fine-tuned toward with each setting of ``--epochs`` × ``--lr`` × ``--batch``
   (Adam, lr × ``--lr-decay`` per epoch: the method's own code,
   :func:`pipeline_lib.attribution.matching.match_outputs`), in this process, starting from
   each of the first ``--k`` originals, and the fine-tuned models are scored by KLoM (forget
   mean / P95, retain P95, validation P95) against the N oracles, with their forget UA.

Prints tables per request; writes only in the work folder (do not share it with a running
:mod:`benchmarks.quality_n100`: both rewrite its params.yaml).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.method_comparison import scratch_project
from benchmarks.quality_n100 import REPO, REQUESTS, _request
from pipeline_lib.config import apply_overrides


def _klom(u: np.ndarray, o: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    from pipeline_lib.evaluation.klom import klom_scores

    s = klom_scores(u[:, idx], o[:, idx])
    return float(s.mean()), float(np.percentile(s, 95))


def _with_logits(targets: list[Any], logits: Any) -> list[Any]:
    """The same matching points with other target logits (one (P, C) row per original)."""
    from pipeline_lib.attribution.matching import MatchTargets

    return [
        MatchTargets(t.X, z, t.n_forget, t.source) for t, z in zip(targets, logits, strict=True)
    ]


def diagnose(
    root: Path,
    request_file: Path,
    ms: list[int],
    k: int,
    grid: list[dict[str, Any]],
    with_om: bool,
    lams: list[float] | None = None,
    tune_only: list[str] | None = None,
    anchor: bool = False,
    ms_direct: list[float] | None = None,
) -> None:
    import torch

    from pipeline_lib.attribution.datamodels import margins as margins_of
    from pipeline_lib.attribution.matching import (
        MatchTargets,
        match_outputs,
        matching_retain_rows,
    )
    from pipeline_lib.attribution.store import AttributionStore
    from pipeline_lib.config import RayConfig, load_params, parse_section, to_dict
    from pipeline_lib.evaluation.ulira import ulira_auc
    from pipeline_lib.models.image import build_model
    from pipeline_lib.training.fit import predict_logits
    from tasks import attribution as ray_attr
    from tasks import evaluation as ray_eval
    from tasks.stores import ensure_store

    t0 = time.perf_counter()
    st = ray_eval.stage_request(
        load_params(root / "params.yaml", {"request.file": str(request_file)})
    )
    params, request, data, man = st.params, st.request, st.data, st.manifests
    prepared_dir, manifests_dir = st.prepared_dir, st.manifests_dir
    train_ids, retain_mask = st.train_ids, st.retain_mask
    ray_attr.connect(parse_section(RayConfig, to_dict(params.ray), "ray"))
    n, ev = params.evaluate.n_models, params.evaluate
    originals_root, _ = ensure_store(params, data, "originals", n, None, ev.originals_seed)
    oracles_root, _ = ensure_store(params, data, "oracles", n, retain_mask, ev.oracles_seed)
    om_p = params.unlearn.oracle_matching
    om_root = (
        ensure_store(params, data, "oracles", om_p.n_oracles, retain_mask, om_p.seed)[0]
        if with_om
        else None
    )
    originals = AttributionStore.open(originals_root)
    problem = ray_eval.build_problem(originals, prepared_dir, manifests_dir)
    labels = problem.y.numpy()
    orig_out = originals.load()[2].astype(np.float32)
    oracle_out = AttributionStore.open(oracles_root).load()[2].astype(np.float32)
    oracle_m = margins_of(oracle_out, labels)
    orig_k = orig_out[:k]
    print(
        f"\n## {request.request_id}: |F| = {len(problem.forget)}, N = {n} oracles, first {k} "
        f"originals, stores ready in {time.perf_counter() - t0:.0f}s"
    )

    dmm_p = params.unlearn.dmm
    targets: dict[str, list[MatchTargets]] = {}
    # the matching points, as matching_targets_for draws them
    rows = matching_retain_rows(
        len(problem.forget), len(problem.retain), dmm_p.retain_multiple, params.unlearn.seed
    )
    cols = np.concatenate([problem.forget, problem.retain[rows]])
    for m in ms:
        # one store directory grows with M; ensuring it at m brings its manifest to m models,
        # so each M's targets are computed right after (a later M would change the store)
        store_m = ensure_store(params, data, "subsets", m)[0]
        for lam in lams or [params.attribution.lam]:
            name = f"dmm M={m}" + (f" lam={lam:g}" if lams else "")
            t1 = time.perf_counter()
            targets[name] = ray_eval.matching_targets_for(
                "datamodels", store_m, problem, orig_k, train_ids, man.forget_ids,
                dmm_p.retain_multiple, params.unlearn.seed, lam, params.attribution.estimator,
                anchor=False,
            )  # fmt: skip
            print(f"  targets {name}: {time.perf_counter() - t1:.1f}s")
            if anchor:
                anchored = ray_eval.matching_targets_for(
                    "datamodels", store_m, problem, orig_k, train_ids, man.forget_ids,
                    dmm_p.retain_multiple, params.unlearn.seed, lam,
                    params.attribution.estimator, anchor=True,
                )  # fmt: skip
                targets[name + " anchored"] = anchored
                plain = torch.stack([t.logits for t in targets[name]])
                own = torch.stack([t.logits for t in anchored])
                orig = torch.from_numpy(orig_k[:, cols].astype(np.float32))
                # the anchor from the originals' mean instead of each original's own logits:
                # |F|·κ_k = plain_k − anchored_k = c·(f_k − f̂(D)) removes c of original k's
                # seed deviation from its target (a narrower spread than retraining's); its
                # mean over the originals, c·(f̄ − f̂(D)), keeps every deviation
                targets[name + " anchored (originals' mean)"] = _with_logits(
                    anchored, plain - (plain - own).mean(dim=0)
                )
                # DM-Direct's m (f_θ − m·Σ_F β, the paper's m = 1) on the anchored shift
                for mult in ms_direct or []:
                    targets[name + f" anchored m={mult:g}"] = _with_logits(
                        anchored, orig + mult * (own - orig)
                    )
    if om_root is not None:
        targets["om (10 oracles)"] = ray_eval.matching_targets_for(
            "oracles", om_root, problem, orig_k, train_ids, man.forget_ids,
            om_p.retain_multiple, params.unlearn.seed, params.attribution.lam,
            params.attribution.estimator,
        )  # fmt: skip
    nf = len(problem.forget)
    true_shift = oracle_out.mean(axis=0) - orig_out.mean(axis=0)  # (T, C)
    any_t = next(iter(targets.values()))[0]
    targets["ideal shift"] = [
        MatchTargets(any_t.X, torch.from_numpy((z[cols] + true_shift[cols]).astype(np.float32)), nf, "datamodels")
        for z in orig_k
    ]  # fmt: skip
    targets["none"] = [
        MatchTargets(any_t.X, torch.from_numpy(z[cols].astype(np.float32)), nf, "datamodels")
        for z in orig_k
    ]  # fmt: skip

    o_cols = oracle_m[:, cols]
    fi, ri = np.arange(nf), np.arange(nf, len(cols))
    y_cols = labels[cols]
    true_mshift = (oracle_m.mean(axis=0) - margins_of(orig_out, labels).mean(axis=0))[cols]
    print(
        "\n| targets | forget KLoM mean | forget KLoM P95 | retain-match KLoM mean | "
        "retain-match KLoM P95 | corr(shift, true) on F | mean margin shift on F (true "
        f"{true_mshift[fi].mean():.3f}) | U-LiRA AUC on F |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, ts in targets.items():
        tm = np.stack([margins_of(t.logits.numpy(), y_cols) for t in ts])
        fm, fp = _klom(tm, o_cols, fi)
        rm, rp = _klom(tm, o_cols, ri)
        sh = (tm - margins_of(orig_k[:, cols], y_cols)).mean(axis=0)
        c = np.corrcoef(sh[fi], true_mshift[fi])[0, 1] if sh[fi].std() > 0 else float("nan")
        # U-LiRA of the targets as if they were k unlearned models (0.5: per example they
        # look like the oracles); the matching step can only add to it
        ul = ulira_auc(tm[:, fi], o_cols[:, fi])["auc"] if k >= 2 else float("nan")
        print(
            f"| {name} | {fm:.3f} | {fp:.3f} | {rm:.3f} | {rp:.3f} | {c:.3f} | "
            f"{sh[fi].mean():.3f} | {ul:.3f} |"
        )

    cfg = params.model
    shape = tuple(problem.X.shape[1:])
    weights = dict(originals.model_weights())
    split = problem.split_indices()
    print(
        "\n| targets | epochs | lr | batch | lr_decay | forget KLoM mean | forget P95 | "
        "retain P95 | val P95 | UA | U-LiRA AUC | seconds/model |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for g in grid:
        for name, ts in targets.items():
            if name == "none" or (tune_only and name not in tune_only):
                continue
            margins = []
            secs = 0.0
            ua = []
            for i in range(k):
                model = build_model(cfg, shape, problem.n_classes, seed=0)
                model.load_state_dict(dict(weights[i]))
                t1 = time.perf_counter()
                match_outputs(
                    model, ts[i], g["epochs"], g["lr"], g["batch"], g["lr_decay"], 0.0,
                    params.unlearn.seed + i,
                )  # fmt: skip
                secs += time.perf_counter() - t1
                logits = predict_logits(model, problem.X).numpy()
                margins.append(margins_of(logits, labels))
                ua.append(
                    100.0 * (logits[problem.forget].argmax(1) != labels[problem.forget]).mean()
                )
            u = np.stack(margins)
            fm, fp = _klom(u, oracle_m, split["forget"])
            _, rp = _klom(u, oracle_m, split["retain"])
            _, vp = _klom(u, oracle_m, split["validation"])
            ul = ulira_auc(u[:, split["forget"]], oracle_m[:, split["forget"]])["auc"]
            print(
                f"| {name} | {g['epochs']} | {g['lr']:g} | {g['batch']} | {g['lr_decay']} | "
                f"{fm:.3f} | {fp:.3f} | {rp:.3f} | {vp:.3f} | {np.mean(ua):.2f} | {ul:.3f} | "
                f"{secs / k:.2f} |",
                flush=True,
            )
    base = np.stack([margins_of(z, labels) for z in orig_k])
    fm, fp = _klom(base, oracle_m, split["forget"])
    _, rp = _klom(base, oracle_m, split["retain"])
    _, vp = _klom(base, oracle_m, split["validation"])
    ul = ulira_auc(base[:, split["forget"]], oracle_m[:, split["forget"]])["auc"]
    print(
        f"| none (original) | - | - | - | - | {fm:.3f} | {fp:.3f} | {rp:.3f} | {vp:.3f} | - | "
        f"{ul:.3f} | - |"
    )
    print(f"({request.request_id}: {time.perf_counter() - t0:.0f}s)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/unlearnflow-quality-n100")
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--subset-models", default="400,1000", help="comma-separated M values")
    ap.add_argument("--requests", default="heldout-10,heldout-1")
    ap.add_argument("--k", type=int, default=20, help="originals fine-tuned per setting")
    ap.add_argument("--epochs", default="5,27,60")
    ap.add_argument("--lr", default="5e-4,2e-3")
    ap.add_argument("--batch", default="512,64")
    ap.add_argument("--lr-decay", type=float, default=0.95)
    ap.add_argument("--no-om", action="store_true")
    ap.add_argument(
        "--anchor", action="store_true", help="also DM-Direct with the full-model anchor"
    )
    ap.add_argument("--lams", default="", help="ridge penalties to compare (default: params')")
    ap.add_argument(
        "--m-direct",
        default="",
        help="with --anchor: DM-Direct multipliers m to compare (paper: 1)",
    )
    ap.add_argument(
        "--tune-only", default="", help="';'-separated target names the grid fine-tunes toward"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    for key, value in (
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("DVC_NO_ANALYTICS", "1"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("PREFECT_LOGGING_LEVEL", "WARNING"),
    ):
        os.environ.setdefault(key, value)
    root = Path(args.workdir).resolve()
    ms = [int(x) for x in args.subset_models.split(",")]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["attribution"].update(n_models=ms[0], chunk_size=50, lds_heldout=0)
    params["evaluate"]["n_models"] = args.models
    params["tracking"].update(mlflow_uri=f"sqlite:///{root / 'mlflow.db'}", dvc_root=str(root))
    params["request"]["file"] = "requests/val-10.yaml"
    params = apply_overrides(
        params, {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    )
    scratch_project(root, params)
    files = {rid: _request(root, rid) for rid in REQUESTS}
    grid = [
        {"epochs": int(e), "lr": float(lr), "batch": int(b), "lr_decay": args.lr_decay}
        for e, lr, b in itertools.product(
            args.epochs.split(","), args.lr.split(","), args.batch.split(",")
        )
    ]
    wall0 = time.perf_counter()
    for rid in args.requests.split(","):
        diagnose(
            root, files[rid], ms, args.k, grid, not args.no_om,
            [float(x) for x in args.lams.split(",") if x],
            [x for x in args.tune_only.split(";") if x], args.anchor,
            [float(x) for x in args.m_direct.split(",") if x],
        )  # fmt: skip
    print(f"\ntotal {time.perf_counter() - wall0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
