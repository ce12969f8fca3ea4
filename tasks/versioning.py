"""DVC edge: keep ``params.yaml`` in step with the run's effective parameters, run the
``prepare``/``extract`` stages through ``dvc repro``, and read their md5s from ``dvc.lock``."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.logging import get_run_logger

from pipeline_lib.config import to_dict
from pipeline_lib.io import atomic_path

#: params.yaml sections the DVC stages read (see dvc.yaml).
DVC_SECTIONS = ("data", "request")


class StageFailed(RuntimeError):
    """``dvc repro`` failed; the message carries the stage's own error."""


def stage_request_file(dvc_root: Path, request_file: str, request_id: str) -> str:
    """Return ``request_file`` relative to ``dvc_root``; copy it under ``requests/`` first
    when it lies outside, so the request is versioned with the data it selects."""
    src = Path(request_file).resolve()
    root = dvc_root.resolve()
    if src.is_relative_to(root):
        return str(src.relative_to(root))
    dest = root / "requests" / f"{request_id}.yaml"
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return str(dest.relative_to(root))


def sync_params_file(
    dvc_root: Path,
    params: Any,
    sections: tuple[str, ...] = DVC_SECTIONS,
    filename: str = "params.yaml",
) -> list[str]:
    """Write ``sections`` of ``params`` into ``<dvc_root>/<filename>``, as ``dvc exp run -S``
    would, keeping comments and every other key. Returns the changed dotted keys.
    (The LM pipeline's stages read ``params-lm.yaml``.)"""
    from ruamel.yaml import YAML  # installed with dvc; round-trips comments

    path = dvc_root / filename
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text()) if path.exists() else {}
    wanted = to_dict(params)
    changed = []
    for section in sections:
        node = doc.setdefault(section, {})
        for key, value in wanted[section].items():
            if key not in node or node[key] != value:
                node[key] = value
                changed.append(f"{section}.{key}")
    if changed:
        buf = io.StringIO()
        rt.dump(doc, buf)
        with atomic_path(path) as tmp:
            tmp.write_text(buf.getvalue())
    return changed


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands say `python`: make it this interpreter, venv activated or not.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def ensure_dvc_repo(dvc_root: Path) -> None:
    if not (dvc_root / ".dvc").is_dir():
        raise StageFailed(
            f"{dvc_root} is not a DVC repository (no .dvc/): run `dvc init` there, "
            "or set tracking.dvc_root"
        )
    if not (dvc_root / "dvc.yaml").is_file():
        raise StageFailed(f"{dvc_root}: dvc.yaml not found")


@task(
    name="dvc-repro",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=lambda task, run, state: (
        not isinstance(state.result(raise_on_failure=False), StageFailed)
    ),
)
def dvc_repro(dvc_root: str, stage: str, lock: str = "dvc.lock") -> dict[str, Any]:
    """Run ``dvc repro <stage>`` in ``dvc_root``; return the md5 of every stage out, read
    from ``lock`` (``lm/dvc.lock`` for the stages of ``lm/dvc.yaml``).

    Bad inputs (exit code 2 from a stage: invalid request, missing data) are not retried;
    anything else (a lock held by another process, an I/O hiccup) is, twice."""
    root = Path(dvc_root)
    ensure_dvc_repo(root)
    logger = get_run_logger()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", stage],
        cwd=root,
        env=_dvc_env(),
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.strip():
            logger.info("dvc: %s", line)
    if proc.returncode != 0:
        # The stage's own `error: ...` line is the useful part; dvc wraps it in noise.
        errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("error:")]
        detail = errors[-1][len("error:") :].strip() if errors else proc.stderr.strip()[-2000:]
        exc_type = StageFailed if errors else RuntimeError
        raise exc_type(f"dvc repro {stage} failed: {detail}")
    return read_lock_md5s(root, lock)


def read_lock_md5s(dvc_root: Path, lock_file: str = "dvc.lock") -> dict[str, Any]:
    """{stage: {out path: md5}} from ``dvc.lock``."""
    lock = yaml.safe_load((dvc_root / lock_file).read_text())
    return {
        name: {o["path"]: o["md5"] for o in stage.get("outs", [])}
        for name, stage in lock.get("stages", {}).items()
    }


def stage_md5(md5s: dict[str, Any], stage: str, out: str) -> str:
    """The md5 of ``out`` in ``stage`` (lock files of sub-directory stage files may name the
    out relative to their own folder)."""
    outs = md5s[stage]
    return outs.get(out) or outs[next(k for k in outs if k.endswith(out))]


@task(name="validate-request")
def validate_request(modality: str, request: Any, prepared_dir: str) -> dict[str, int]:
    """Resolve the request against the prepared data; raises RequestError naming the problem."""
    from pipeline_lib.modalities import get_modality

    n_forget, n_retain = get_modality(modality).check_request(request, prepared_dir)
    return {"n_forget": n_forget, "n_retain": n_retain}


def stage_data(modality: Any, params: Any, request: Any) -> tuple[Any, dict[str, Any]]:
    """Run the modality's DVC stages for this run's parameters.

    The data sections are synced into the DVC root's params file (as ``dvc exp run -S``
    would) and ``dvc repro prepare`` runs; the request is then checked against the prepared
    data in-process, so a bad request fails with a clear message *before* it is written into
    the params file; only then are the ``request`` keys synced and ``dvc repro extract``
    runs. Returns the params (request.file made relative to the DVC root) and the stage md5s."""
    from pipeline_lib.config import replace

    logger = get_run_logger()
    root = Path(params.tracking.dvc_root).resolve()
    pfile = modality.params_file
    prefix = "" if modality.dvc_file == "dvc.yaml" else f"{modality.dvc_file}:"
    for key in sync_params_file(root, params, modality.data_sections, pfile):
        logger.info("%s: set %s for DVC", pfile, key)
    dvc_repro(str(root), f"{prefix}prepare", modality.lock_file)
    validate_request(modality.name, request, str(params.resolve(modality.prepared_out(params))))
    rel = stage_request_file(root, str(params.resolve(params.request.file)), request.request_id)
    params = replace(params, request=replace(params.request, file=rel))
    for key in sync_params_file(root, params, ("request",), pfile):
        logger.info("%s: set %s for DVC", pfile, key)
    return params, dvc_repro(str(root), f"{prefix}extract", modality.lock_file)
