"""Where `make run`'s unlearning time goes (issue 15): `unlearn run` on a fresh clone, in a
fresh process per run, with every piece of the request timed, and the printed
unlearning ÷ retraining ratio beside the same ratio of the algorithm's own work.

    python -m benchmarks.make_run_cost --runs 3
    python -m benchmarks.make_run_cost --runs 3 --threads 1

Each run: ``git clone`` of this repository's HEAD (``--rev``: another revision) into a
temporary directory, then a new Python process there that wraps the pipeline's functions
with timers (they run unchanged) and calls ``unlearn run`` (``flows.cli.main(["run"])``: the DVC stages, the first
production version, the oracle, the request, the evaluation, MLflow). ``--code worktree``
imports the code from this working tree instead of the clone (uncommitted changes).

Per run, wall seconds and the calling thread's CPU seconds (``time.thread_time``: with more
than one torch thread the OpenMP workers' CPU is not in it; ``--threads 1`` makes it the
whole work) of:

- *retrain*: the oracle's ``fit`` (30 epochs on R): the ratio's denominator, as printed;
- *request statistics*: Σ_F (``fisher_diagonal_sum`` over F: timed by the pipeline), the
  stored Σ_D read and the subtraction (timed), and what the pipeline does not time (model
  load, the identities, the I_F / I_R files written, the Prefect task around it);
- *method*: ``method.fn`` (timed by the pipeline), of which the mask (``select_by_ratio``)
  and the fine-tuning ``fit``; and around it, untimed, the splits, model and statistics
  loads, the weights saved, the Prefect task;
- the ratio printed by ``unlearn run`` and the *algorithm's* ratio (Σ_F + the mask + the
  fine-tuning) ÷ retrain, wall and CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- child side

RECORDS: list[dict[str, Any]] = []


def _others_cpu() -> float:
    """CPU seconds of this process's children (the temporary Prefect API server, DVC), which
    share the cores with the timed work."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


_STACK: list[str] = []


def _timed(fn, name: str, info=None, children: bool = False):
    """``fn`` with its wall, thread-CPU and process-CPU seconds recorded. Wrappers inside the
    pipeline's own timed regions add a few clock reads only; ``children`` (reading the child
    processes' CPU from /proc, milliseconds) only for wrappers around whole tasks, and
    outside their clocks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _STACK.append(name)
        outer = _STACK[0]
        s0 = _others_cpu() if children else 0.0
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            wall = time.perf_counter() - t0
            cpu, process_cpu = time.thread_time() - c0, time.process_time() - p0
            _STACK.pop()
            RECORDS.append(
                {
                    "name": name,
                    "outer": outer,
                    "wall": wall,
                    "cpu": cpu,
                    "process_cpu": process_cpu,
                    "children_cpu": (_others_cpu() - s0) if children else None,
                    "thread": threading.get_ident(),
                    **(info(args, kwargs) if info else {}),
                }
            )

    return wrapper


def _wrap(module, attr: str, name: str, info=None, children: bool = False) -> None:
    setattr(module, attr, _timed(getattr(module, attr), name, info, children))


def _n(args, kwargs) -> dict[str, Any]:
    X = args[1] if len(args) > 1 else kwargs.get("X")
    settings = args[3] if len(args) > 3 else kwargs.get("settings")
    return {"n": len(X), "epochs": settings.epochs, "batch_size": settings.batch_size}


def _instrument() -> dict[str, Any]:
    """Wrap the functions of the request's path with timers; returns where the sweep's
    result will be put."""
    import flows.service as service_flow
    import pipeline_lib.methods.fisher_diagonal as fd
    import pipeline_lib.training.fit as fit_module
    import tasks.method_inputs as mi
    import tasks.statistics as st
    from pipeline_lib.modalities import image

    # the loggers of the trainer and of the method (their records go to Prefect's handlers)
    for logger in {fit_module.log, fd.log}:
        _wrap(logger, "info", "log.info")
    _wrap(image, "fit", "train.fit", _n)
    _wrap(fd, "fit", "method.fit", _n)
    _wrap(fd, "select_by_ratio", "method.select_by_ratio")
    _wrap(mi, "fisher_statistics", "stats.task", children=True)
    _wrap(mi, "with_files", "unlearn.task", children=True)
    for attr in (
        "fisher_diagonal_sum",
        "load_stats",
        "retain_from_full",
        "_save",
        "lookup",
        "load_model",
        "load_prepared",
        "load_manifests",
        "full_fisher_sums",
        "retain_source",
    ):
        _wrap(st, attr, f"stats.{attr}")
    for attr in ("load_model", "unlearn_inputs", "save_model"):
        _wrap(image, attr, f"unlearn.{attr}")
    get_method = image.get_method

    def timed_method(name: str):
        m = get_method(name)
        return dataclasses.replace(m, fn=_timed(m.fn, "method.fn"))

    image.get_method = timed_method
    image.MODALITY = dataclasses.replace(
        image.MODALITY, load_splits=_timed(image.MODALITY.load_splits, "load_splits")
    )
    out: dict[str, Any] = {}
    sweep = service_flow.sweep_flow

    def timed_sweep(*args, **kwargs):
        res = sweep(*args, **kwargs)
        out["processed"] = [
            {"request_id": r["request_id"], "cost": (r.get("report") or {}).get("cost")}
            for r in res["processed"]
        ]
        return res

    service_flow.sweep_flow = timed_sweep
    return out


def child(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = _instrument()
    from flows.cli import main

    t0 = time.perf_counter()
    rc = main(["run", *(f"--set={kv}" for kv in args.set or [])])
    Path(args.out).write_text(
        json.dumps(
            {
                "rc": rc,
                "total_wall": time.perf_counter() - t0,
                "records": RECORDS,
                **out,
            }
        )
    )
    return rc


# ----------------------------------------------------------------------------- parent side


def _sum(records, name: str, outer: str | None = None, key: str = "wall") -> float:
    return sum(r[key] for r in records if r["name"] == name and outer in (None, r["outer"]))


def summarise(res: dict[str, Any]) -> dict[str, float]:
    """The pieces of one run (seconds), from its records."""
    recs = res["records"]
    oracle = [r for r in recs if r["name"] == "train.fit"][-1]  # original first, then oracle
    fits = [r for r in recs if r["name"] == "method.fit"]
    cost = res["processed"][0]["cost"]
    row: dict[str, float] = {
        "printed_unlearn": cost["unlearn_seconds"],
        "printed_retrain": cost["retrain_seconds"],
        "printed_ratio": cost["unlearn_over_retrain"],
    }
    for key in ("wall", "cpu"):
        k = "" if key == "wall" else "_cpu"
        stats_task = _sum(recs, "stats.task", key=key)
        sigma_f = _sum(recs, "stats.fisher_diagonal_sum", "stats.task", key)
        derive = _sum(recs, "stats.load_stats", "stats.task", key) + _sum(
            recs, "stats.retain_from_full", "stats.task", key
        )
        method = _sum(recs, "method.fn", key=key)
        mask = _sum(recs, "method.select_by_ratio", key=key)
        ft = _sum(recs, "method.fit", key=key)
        unlearn_task = _sum(recs, "unlearn.task", key=key)
        retrain = oracle[key]
        row.update(
            {
                f"retrain{k}": retrain,
                f"stats_task{k}": stats_task,
                f"sigma_f{k}": sigma_f,
                f"derive{k}": derive,
                f"stats_untimed{k}": stats_task - sigma_f - derive,
                f"method{k}": method,
                f"mask{k}": mask,
                f"finetune{k}": ft,
                f"method_rest{k}": method - mask - ft,
                f"unlearn_untimed{k}": unlearn_task - method,
                f"ratio_timed{k}": (sigma_f + derive + method) / retrain,
                f"ratio_algorithm{k}": (sigma_f + mask + ft) / retrain,
            }
        )
    logs = [r for r in recs if r["name"] == "log.info"]
    n_oracle_logs = oracle["epochs"]  # one record per epoch; the original's come first
    for label, sel in (
        ("retrain", [r for r in logs if r["outer"] == "train.fit"][-n_oracle_logs:]),
        ("method", [r for r in logs if r["outer"] == "unlearn.task"]),
    ):
        row[f"{label}_logs"] = len(sel)
        row[f"{label}_log_seconds"] = sum(r["wall"] for r in sel)
        row[f"{label}_log_seconds_cpu"] = sum(r["cpu"] for r in sel)
    row["retrain_steps"] = oracle["epochs"] * -(-oracle["n"] // oracle["batch_size"])
    row["finetune_steps"] = sum(f["epochs"] * -(-f["n"] // f["batch_size"]) for f in fits)
    row["retrain_ms_per_step"] = 1000 * row["retrain"] / row["retrain_steps"]
    row["finetune_ms_per_step"] = 1000 * row["finetune"] / max(row["finetune_steps"], 1)
    row["total_wall"] = res["total_wall"]
    return row


LINES = (
    ("printed by unlearn run: unlearning s", "printed_unlearn", None),
    ("printed: retraining s", "printed_retrain", None),
    ("printed: ratio", "printed_ratio", None),
    ("retrain: oracle fit s", "retrain", "retrain_cpu"),
    ("  log records in it (count)", "retrain_logs", None),
    ("  log records in it s", "retrain_log_seconds", "retrain_log_seconds_cpu"),
    ("request statistics, Prefect task s", "stats_task", "stats_task_cpu"),
    ("  Σ_F (timed)", "sigma_f", "sigma_f_cpu"),
    ("  read Σ_D + subtraction (timed)", "derive", "derive_cpu"),
    ("  untimed (loads, identities, files, task)", "stats_untimed", "stats_untimed_cpu"),
    ("method.fn (timed)", "method", "method_cpu"),
    ("  mask: select_by_ratio", "mask", "mask_cpu"),
    ("  fine-tuning fit", "finetune", "finetune_cpu"),
    ("  rest: reset, sample draw", "method_rest", "method_rest_cpu"),
    ("  log records in it (count)", "method_logs", None),
    ("  log records in it s", "method_log_seconds", "method_log_seconds_cpu"),
    ("unlearn task untimed (loads, save, task)", "unlearn_untimed", "unlearn_untimed_cpu"),
    ("ratio of the timed pieces", "ratio_timed", "ratio_timed_cpu"),
    ("ratio of the algorithm (Σ_F+mask+fit)", "ratio_algorithm", "ratio_algorithm_cpu"),
    ("retrain ms/step", "retrain_ms_per_step", None),
    ("fine-tuning ms/step", "finetune_ms_per_step", None),
    ("steps: retrain", "retrain_steps", None),
    ("steps: fine-tuning", "finetune_steps", None),
    ("unlearn run, whole process s", "total_wall", None),
)


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"


def report(rows: list[dict[str, float]]) -> str:
    head = ["piece (wall; cpu = calling thread)"] + [f"run {i + 1}" for i in range(len(rows))]
    head += ["mean", "min", "max"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for label, wall, cpu in LINES:
        for key, suffix in ((wall, ""), (cpu, " [cpu]")):
            if key is None:
                continue
            vals = [r[key] for r in rows]
            cells = [_fmt(v) for v in vals]
            cells += [_fmt(statistics.fmean(vals)), _fmt(min(vals)), _fmt(max(vals))]
            lines.append(" | ".join([label + suffix, *cells]))
    return "\n".join(f"| {line} |" for line in lines)


def one_run(args: argparse.Namespace, i: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="make-run-cost-") as tmp:
        project = Path(tmp) / "p"
        subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
        if args.rev:
            git = ["git", "-C", str(project), "-c", "advice.detachedHead=false"]
            subprocess.run([*git, "checkout", "-q", args.rev], check=True)
        code = REPO if args.code == "worktree" else project
        env = {**os.environ, "PYTHONPATH": str(code)}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child"]
        cmd += ["--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
        cmd += [f"--set={kv}" for kv in args.set or []]
        log = Path(tmp) / "run.log"
        with log.open("w") as fh:
            rc = subprocess.run(cmd, cwd=project, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if rc.returncode != 0 or not out.is_file():
            tail = log.read_text()[-3000:]
            raise SystemExit(f"run {i + 1}: unlearn run failed (rc {rc.returncode}):\n{tail}")
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            for f in (out, log):
                (Path(args.save) / f"run{i + 1}-{f.name}").write_bytes(f.read_bytes())
        printed = [ln for ln in log.read_text().splitlines() if "vs retraining" in ln]
        print(f"run {i + 1}: {printed[-1].strip() if printed else '(no ratio line)'}", flush=True)
        return summarise(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--code", choices=("clone", "worktree"), default="clone")
    ap.add_argument("--rev", help="check this revision out in the clone (default: HEAD)")
    ap.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="passed to unlearn run (e.g. unlearn.fisher_diagonal.epochs=3)",
    )
    ap.add_argument("--save", help="copy each run's records (JSON) and log into this directory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    print(
        f"unlearn run {' '.join(f'--set {kv}' for kv in args.set or [])}; torch threads "
        f"{args.threads or 'default'}; code: {args.code} {args.rev or 'HEAD'}; load {os.getloadavg()} "
        f"(1/5/15 min); {os.cpu_count()} CPUs",
        flush=True,
    )
    rows = [one_run(args, i) for i in range(args.runs)]
    print(f"load after: {os.getloadavg()}")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
