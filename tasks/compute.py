"""Compute tasks of the one unlearning pipeline: train, unlearn, evaluate, for any modality.

Each task names its modality (``image`` | ``text``) and calls that modality's plain
functions (:mod:`pipeline_lib.modalities`). Training and unlearning are cached across runs
(``INPUTS + TASK_SOURCE`` with persisted results, JSON only: :mod:`tasks.results`): their
inputs carry content digests of the data, the manifests, the weights and of pipeline_lib's
code, so a second run with unchanged inputs skips them and any change re-runs exactly what
depends on it. Results are small dicts of paths and numbers; the tensors live in
content-addressed safetensors files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.logging import get_run_logger

from pipeline_lib.io import weights_ok
from pipeline_lib.modalities import get_modality
from tasks.results import persisted

#: Cached across runs; results persisted as JSON only and read back only if JSON (tasks.results).
CACHED = persisted(INPUTS + TASK_SOURCE)


def _intact(result: dict[str, Any], key: str) -> bool:
    """A result's file is there and, for weights, matches its content digest (a truncated or
    corrupted file counts as missing)."""
    path = Path(result[key])
    if path.suffix != ".safetensors":
        return path.is_file()
    return weights_ok(path, result.get("digest") if key == "path" else None)


def with_files(task_fn, result_keys: tuple[str, ...], *args: Any) -> dict[str, Any]:
    """Call a cached task; if a cached result points at files that are gone (someone cleaned
    the artifacts directory) or damaged (a weights file that does not hash to its digest), remove
    the damaged ones and run the task again instead of failing later."""
    result = task_fn(*args)
    bad = [k for k in result_keys if not _intact(result, k)]
    if not bad:
        return result
    for k in bad:
        Path(result[k]).unlink(missing_ok=True)
    get_run_logger().warning(
        "%s: cached %s missing or corrupt on disk, recomputing",
        task_fn.name,
        ", ".join(result[k] for k in bad),
    )
    fresh = task_fn.with_options(refresh_cache=True)(*args)
    bad = [fresh[k] for k in result_keys if not _intact(fresh, k)]
    if bad:
        raise RuntimeError(f"{task_fn.name}: recomputed, but {', '.join(bad)} is still not intact")
    return fresh


@task(name="train-model", **CACHED)
def train_model(
    modality: str,
    data: dict[str, str],
    role: str,
    sections: dict[str, Any],
    seed: int,
    artifacts_dir: str,
    code: str,
) -> dict[str, Any]:
    """Train the original (``data`` without manifests: the whole training split, reusable
    across requests) or the oracle (``data`` with manifests: the retain set only).

    ``data`` holds the directories and their DVC md5s, which key the cache; ``sections`` the
    ``model`` and ``train`` config sections."""
    return get_modality(modality).train(data, role, sections, seed, artifacts_dir)


@task(name="unlearn", **CACHED)
def unlearn(
    modality: str,
    data: dict[str, str],
    weights: dict[str, Any],
    sections: dict[str, Any],
    extras: dict[str, Any],
    artifacts_dir: str,
    code: str,
) -> dict[str, Any]:
    """Apply the configured unlearning method to the original model. ``extras`` are the inputs
    the method needs beyond the data (Fisher files, an attribution store, the oracle), each
    with the digests that key the cache."""
    return get_modality(modality).unlearn(data, weights["path"], sections, extras, artifacts_dir)


@task(name="evaluate")
def evaluate(
    modality: str,
    data: dict[str, str],
    params: Any,
    weights: dict[str, str],
    unlearn_seconds: float,
    retrain_seconds: float,
    report_dir: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Metrics of original, oracle and unlearned models; report.json and report.png."""
    return get_modality(modality).evaluate(
        data, params, weights, unlearn_seconds, retrain_seconds, report_dir, extra
    )
