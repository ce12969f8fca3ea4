"""Lineage and evidence end to end on digits, and the certificate's render check.

In a fresh project in a temporary folder (real Prefect temporary API, MLflow on SQLite with
its registry, DVC): three requests submitted and swept through the ``unlearn`` command line,
then ``unlearn lineage request | sample | model``, ``unlearn purge --dry-run``, the purge itself
(retention window 0) and ``lineage sample`` again, each run as a separate ``python -m
flows.cli`` process whose output is printed (the README's "Lineage and
evidence" section shows it). Finally the second request's certificate is opened in headless
Chromium and a screenshot saved to the output folder.

    python -m benchmarks.lineage_demo [--out build/lineage-demo] [--oracle always]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.service_sweep import make_project

REPO = Path(__file__).resolve().parents[1]


def _cli(root: Path, *argv: str, log: list[str]) -> str:
    cmd = [sys.executable, "-m", "flows.cli", *argv]
    proc = subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    shown = "unlearn " + " ".join(argv)
    text = f"$ {shown}\n{proc.stdout}"
    log.append(text)
    print(text, flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{shown}: exit {proc.returncode}")
    return proc.stdout


def screenshot(html: Path, png: Path) -> bool:
    """Render ``html`` in headless Chromium into ``png``; False when Chromium is absent."""
    exe = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if exe is None:
        print("chromium not found (apt-get install -y chromium): no screenshot")
        return False
    subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,2200",
            f"--screenshot={png}",
            html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return png.is_file() and png.stat().st_size > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "build" / "lineage-demo"))
    ap.add_argument("--oracle", default="always", choices=("always", "never", "sampled"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="unlearnflow-lineage-demo-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp / "prefect-results")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    root = tmp / "project"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"].update(mlflow_uri="sqlite:///mlflow.db", dvc_root=".")
    params["service"]["oracle"] = args.oracle
    make_project(root, params)
    files = []
    for i, (seed, reason) in enumerate(
        [(11, "GDPR Art. 17 erasure"), (12, "customer request"), (13, "consent withdrawn")],
        start=1,
    ):
        rid = f"req-2026-{i:04d}"
        (root / "requests" / f"{rid}.yaml").write_text(
            yaml.safe_dump(
                {"request_id": rid, "reason": reason, "forget": {"fraction": 0.01, "seed": seed}}
            )
        )
        files.append(f"requests/{rid}.yaml")

    log: list[str] = []
    _cli(root, "submit", *files, log=log)
    _cli(root, "sweep", log=log)
    _cli(root, "lineage", "request", "req-2026-0002", log=log)
    from mlflow import MlflowClient

    from tasks.lineage import read_forget_ids

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.search_runs(
        [client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id],
        filter_string="tags.request_id = 'req-2026-0002'",
    )[0]
    sample = sorted(read_forget_ids(uri, run.info.run_id))[0]
    _cli(root, "lineage", "sample", sample, log=log)
    _cli(root, "lineage", "model", f"{params['service']['model_name']}@production", log=log)
    _cli(root, "purge", "--older-than", "0", "--dry-run", log=log)
    _cli(root, "purge", "--older-than", "0", log=log)
    _cli(root, "lineage", "sample", sample, log=log)
    (out / "cli-output.txt").write_text("\n".join(log))

    cert = Path(run.data.tags["certificate.path"])
    cert = cert if cert.is_absolute() else root / cert
    shutil.copy(cert, out / "certificate.html")
    png = out / "certificate.png"
    if screenshot(cert, png):
        print(f"certificate rendered: {png} ({png.stat().st_size} bytes)")
    print(f"outputs in {out}; project left in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
