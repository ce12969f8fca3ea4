"""DVC edge: run the ``prepare`` / ``extract`` stages through ``dvc repro`` and read their md5s
from the lock files, without ever rewriting a tracked file.

- ``prepare`` runs the stage of the modality's stage file (``dvc.yaml`` / ``lm/dvc.yaml``) when
  the run's data sections equal the params file's at the DVC root. A run with other data
  settings (``--set data.*``) gets a *variant*: a generated stage file and params file under
  ``runs/<modality>/data-<key>/`` with its own lock and output, so it changes nothing another
  run reads.
- ``extract`` is per request: ``runs/<modality>/<request id>/`` holds a copy of the request,
  a generated stage file, its ``dvc.lock`` and the manifests. Two requests never share an
  output; the lock entries of a request are its own.

The run directories' ``dvc.yaml`` / ``dvc.lock`` are the DVC record of each request (commit
them to version it); DVC keeps their outputs out of git.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pipeline_lib.config import to_dict
from pipeline_lib.io import atomic_path

# RUNS_DIR: where the per-request and per-variant stage files live, under the DVC root.
from pipeline_lib.validation import RUNS_DIR, data_variant_dir


class StageFailed(RuntimeError):
    """``dvc repro`` failed; the message carries the stage's own error."""


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


def repro(dvc_root: str, stage: str, lock: str = "dvc.lock", logger: Any = None) -> dict[str, Any]:
    """``dvc repro <stage>`` in ``dvc_root`` outside a Prefect run (``unlearn purge``); see
    :func:`dvc_repro`."""
    root = Path(dvc_root)
    ensure_dvc_repo(root)
    logger = logger or logging.getLogger(__name__)
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


@task(
    name="dvc-repro",
    # never served from a cache: the md5s must be what the lock files say now
    cache_policy=NO_CACHE,
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
    return repro(dvc_root, stage, lock, get_run_logger())


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
    return outs.get(out) or outs[next(k for k in outs if out.endswith(k) or k.endswith(out))]


@task(name="validate-request", cache_policy=NO_CACHE)
def validate_request(modality: str, request: Any, prepared_dir: str) -> dict[str, int]:
    """Resolve the request against the prepared data; raises RequestError naming the problem."""
    from pipeline_lib.modalities import get_modality

    n_forget, n_retain = get_modality(modality).check_request(request, prepared_dir)
    return {"n_forget": n_forget, "n_retain": n_retain}


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _copy_if_changed(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    if dst.is_file() and dst.read_bytes() == data:
        return
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def _stage_file(
    rel_dir: str, name: str, cmd: str, deps: list[str], outs: list[str], params: Any = None
) -> str:
    """A one-stage DVC file whose paths are relative to the DVC root (``wdir``)."""
    depth = len(Path(rel_dir).parts)
    stage: dict[str, Any] = {"wdir": "/".join([".."] * depth), "cmd": cmd, "deps": deps}
    if params:
        stage["params"] = params
    stage["outs"] = outs
    header = "# Generated by unlearnflow for one run: the DVC record of its inputs and outputs.\n"
    return header + yaml.safe_dump({"stages": {name: stage}}, sort_keys=False)


def _code_deps(modality: Any) -> list[str]:
    module = modality.stage_module.replace(".", "/") + ".py"
    return sorted({module, "pipeline_lib/stages.py", "pipeline_lib/data", "pipeline_lib/io.py"})


def purged_ids_path(modality: Any) -> str:
    """The purge list of a modality (DVC-root relative): ids whose rows ``unlearn purge``
    removed from the prepared data. Once it exists every run prepares its data through a
    variant stage that depends on it (``prepare --exclude``), so no run prepares them again."""
    return f"{RUNS_DIR}/{modality.name}/purged_ids.parquet"


def stage_prepare(modality: Any, params: Any, root: Path, runner: Any = None) -> tuple[str, str]:
    """Prepare the data of this run; returns (prepared dir relative to ``root``, its md5).
    ``runner``: how ``dvc repro`` is run (default the :func:`dvc_repro` task; ``unlearn
    purge`` passes :func:`repro`, outside any Prefect run)."""
    run = runner or dvc_repro
    effective = to_dict(params)
    file = root / modality.params_file
    on_file = modality.load_params(file) if file.is_file() else None
    same = on_file is not None and all(
        to_dict(on_file)[s] == effective[s] for s in modality.data_sections
    )
    purged = purged_ids_path(modality)
    exclude = (root / purged).is_file()
    if same and not exclude:
        prefix = "" if modality.dvc_file == "dvc.yaml" else f"{modality.dvc_file}:"
        out = modality.prepared_out(params)
        md5s = run(str(root), f"{prefix}prepare", modality.lock_file)
        return out, stage_md5(md5s, "prepare", out)
    rel = data_variant_dir(modality, params)  # the CLI's up-front checks look there too
    out = f"{rel}/prepared"
    variant = {**effective, **({"pipeline": modality.tag} if modality.tag != "image" else {})}
    if "data" in variant:
        variant["data"] = {**variant["data"], "out_dir": out}
    _write_if_changed(root / rel / "params.yaml", yaml.safe_dump(variant, sort_keys=False))
    cmd = f"python -m {modality.stage_module} prepare --params {rel}/params.yaml --out {out}"
    deps = [*_code_deps(modality), "pipeline_lib/config"]
    if exclude:  # the purge list is a dependency: a longer list prepares the data again
        cmd += f" --exclude {purged}"
        deps.append(purged)
    stage = _stage_file(
        rel, "prepare", cmd, deps, [out], [{f"{rel}/params.yaml": list(modality.data_sections)}]
    )
    _write_if_changed(root / rel / "dvc.yaml", stage)
    md5s = run(str(root), f"{rel}/dvc.yaml:prepare", f"{rel}/dvc.lock")
    why = f"data settings differ from {file.name}" if not same else f"rows purged ({purged})"
    _logger().info("data variant %s (%s)", rel, why)
    return out, stage_md5(md5s, "prepare", out)


def _logger() -> Any:
    """The Prefect run logger inside a run, the module's logger outside one."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def stage_extract(
    modality: Any,
    root: Path,
    request: Any,
    request_file: Path,
    prepared: str,
    exclude: str | None = None,
) -> tuple[str, str]:
    """Extract this request's manifests in its own run directory; returns (manifests dir
    relative to ``root``, md5). The request file is copied in first, so the record does not
    depend on a file the user may edit or delete; so is the tombstone set ``exclude`` (the
    cumulative file grows with every later request, which would make this request's stage
    stale, and a hand-run ``dvc repro`` would then delete its manifests and fail)."""
    rel = f"{RUNS_DIR}/{modality.name}/{request.request_id}"
    copy = root / rel / "request.yaml"
    _write_if_changed(copy, Path(request_file).read_text())
    out = f"{rel}/manifests"
    cmd = (
        f"python -m {modality.stage_module} extract --prepared {prepared} "
        f"--request {rel}/request.yaml --out {out}"
    )
    deps = [*_code_deps(modality), prepared, f"{rel}/request.yaml"]
    if exclude:
        snapshot = f"{rel}/tombstones.parquet"
        _copy_if_changed(root / exclude, root / snapshot)
        cmd += f" --exclude {snapshot}"
        deps.append(snapshot)
    _write_if_changed(root / rel / "dvc.yaml", _stage_file(rel, "extract", cmd, deps, [out]))
    md5s = dvc_repro(str(root), f"{rel}/dvc.yaml:extract", f"{rel}/dvc.lock")
    return out, stage_md5(md5s, "extract", out)


def stage_data(
    modality: Any, params: Any, request: Any, exclude: str | None = None
) -> tuple[Any, dict[str, str]]:
    """Prepare the data and extract this request's manifests (both through ``dvc repro``);
    the request is checked against the prepared data in-process first, so a bad request fails
    with a clear message before anything is written for it.

    Returns the params with ``data.out_dir`` (image) and ``request.out_dir`` pointing at this
    run's outputs, and ``{prepared_dir, prepared_md5, manifests_dir, manifests_md5}``."""
    from pipeline_lib.config import replace

    root = Path(params.tracking.dvc_root).resolve()
    request_file = params.resolve(params.request.file)
    prepared, prepared_md5 = stage_prepare(modality, params, root)
    validate_request(modality.name, request, str(root / prepared))
    manifests, manifests_md5 = stage_extract(
        modality, root, request, request_file, prepared, exclude
    )
    changes: dict[str, Any] = {}
    if hasattr(params.request, "out_dir"):
        changes["request"] = replace(params.request, out_dir=manifests)
    if hasattr(params, "data"):
        changes["data"] = replace(params.data, out_dir=prepared)
    params = replace(params, **changes)
    return params, {
        "prepared_dir": str(root / prepared),
        "prepared_md5": prepared_md5,
        "manifests_dir": str(root / manifests),
        "manifests_md5": manifests_md5,
    }
