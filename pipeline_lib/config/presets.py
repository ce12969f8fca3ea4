"""Named hyper-parameter presets: tuned settings of the unlearning methods, per dataset and model.

A preset is a folder ``presets/<name>/`` (under ``tracking.dvc_root``; ``unlearn tune`` names
it ``<dataset>-<model>``, e.g. ``digits-mlp``) holding one YAML file per tuned method::

    preset: digits-mlp
    method: dmm
    dataset: digits
    model: mlp
    params:            # the whole unlearn.dmm section of the best trial
      epochs: 37
      lr: 0.0042
      ...
    tuning:            # where it came from (objective, score, request, trials, MLflow run)
      ...

``unlearn.preset: NAME`` in params.yaml (or ``--preset NAME``) sets ``unlearn.<method>`` of
every method that has a file in the folder; explicit ``--set`` overrides still win. A preset
tuned on another dataset or model than the params describe is refused, naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from pipeline_lib.io import atomic_path
from pipeline_lib.schema import ConfigError, Field, Int, Str, section

PRESETS_DIR = "presets"
#: What ``unlearn tune`` can minimise (a trial's metric of that name; lower is better).
Objective = Literal["klom_forget_mean", "klom_forget_p95", "avg_gap"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)


@section("tune")
class TuneConfig:
    """``unlearn tune``: a Ray Tune random search over a method's declared space, scored
    against the evaluation's oracle ensemble on a validation request."""

    #: Tune trials; the first evaluates the params' current setting, the rest are samples.
    trials: Int = Field(12, gt=0)
    #: Originals each trial unlearns: the first of the evaluation's originals store (of
    #: ``evaluate.n_models``); at most ``evaluate.n_models``.
    models: Int = Field(10, gt=0)
    #: What the search minimises: forget-KLoM mean, forget-KLoM P95 (the tail: the worst
    #: forgotten points), or Avg. Gap to the oracles' mean metrics.
    objective: Objective = "klom_forget_mean"
    #: Seed of the random search (the sampled settings).
    seed: Int = 0
    #: CPUs (and torch threads) per trial.
    cpus_per_trial: Int = Field(1, gt=0)
    #: Trials running at once (null: as many as the CPUs allow).
    max_concurrent: Int | None = Field(None, gt=0)
    #: Ray Tune's experiment folders (relative to tracking.dvc_root).
    out_dir: Str = "artifacts/tune"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def preset_name(dataset: str, model: str) -> str:
    """The default name of a preset: ``<dataset>-<model>``."""
    return f"{dataset}-{model}"


def check_name(name: str, key: str = "unlearn.preset") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{key}: {name!r} is not a preset name (letters, digits, '-', '_', '.'; no path)"
        )
    return name


def preset_dir(root: str | Path, name: str) -> Path:
    return Path(root).resolve() / PRESETS_DIR / check_name(name)


def preset_file(root: str | Path, name: str, method: str) -> Path:
    return preset_dir(root, name) / f"{method}.yaml"


def read_preset(path: str | Path) -> dict[str, Any]:
    """One preset file, checked: a mapping with ``method``, ``dataset``, ``model`` (strings) and
    ``params`` (a mapping); the method must be the file's stem. ConfigError names the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a mapping")
    for key in ("method", "dataset", "model"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{path}: {key} missing or not a string")
    if not isinstance(raw.get("params"), dict):
        raise ConfigError(f"{path}: params missing or not a mapping")
    if raw["method"] != path.stem:
        raise ConfigError(f"{path}: method {raw['method']!r} differs from the file name")
    return raw


def _selected(tree: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(name, tracking.dvc_root) of the preset a raw params tree selects, or None."""
    unlearn = tree.get("unlearn") or {}
    name = unlearn.get("preset") if isinstance(unlearn, Mapping) else None
    if name is None:
        return None
    tracking = tree.get("tracking") or {}
    return name, tracking.get("dvc_root", ".") if isinstance(tracking, Mapping) else "."


def preset_overrides(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted overrides (``unlearn.<method>.<key>``) of the preset a raw params tree selects
    (``unlearn.preset``); empty when none is selected. The preset folder must exist and hold
    at least one method, each tuned on the dataset and model the tree names."""
    selected = _selected(tree)
    if selected is None:
        return {}
    name, root = selected
    folder = preset_dir(root, name)
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"unlearn.preset: no preset {name!r} ({folder} has no <method>.yaml)")
    dataset = (tree.get("data") or {}).get("name", "digits")
    model = (tree.get("model") or {}).get("name", "mlp")
    out: dict[str, Any] = {}
    for file in files:
        p = read_preset(file)
        if (p["dataset"], p["model"]) != (dataset, model):
            raise ConfigError(
                f"unlearn.preset: {file} was tuned on {p['dataset']}/{p['model']}; the params "
                f"describe {dataset}/{model}"
            )
        for key, value in p["params"].items():
            out[f"unlearn.{p['method']}.{key}"] = value
    return out


def preset_store_mismatch(
    tree: Mapping[str, Any], method: str, n_models: int, alpha: float | None = None
) -> str | None:
    """A one-line warning when the preset a raw params tree selects tuned ``method`` against
    another subset store than this run's: another size than ``n_models``
    (``tuning.subset_models``) or, when ``alpha`` is given, another subset fraction
    (``tuning.subset_alpha``). Both are recorded for the datamodel methods: their ridge penalty
    and step sizes were chosen for that store. None when the store matches, nothing is
    recorded, or no preset (or no file for the method) is selected."""
    selected = _selected(tree)
    if selected is None:
        return None
    name, root = selected
    file = preset_file(root, name, method)
    if not file.is_file():
        return None
    tuning = read_preset(file).get("tuning") or {}
    tuned_m, tuned_a = tuning.get("subset_models"), tuning.get("subset_alpha")
    differs = []
    if tuned_m is not None and int(tuned_m) != int(n_models):
        differs.append((f"{tuned_m} subset models", f"{n_models}", "attribution.n_models"))
    if alpha is not None and tuned_a is not None and float(tuned_a) != float(alpha):
        differs.append((f"subsets of alpha {tuned_a:g}", f"{alpha:g}", "attribution.alpha"))
    if not differs:
        return None
    return (
        f"unlearn.preset {name!r}: "
        + "; ".join(
            f"{method} was tuned with {was} ({key}); this run has {now}"
            for was, now, key in differs
        )
        + ", for which its setting is untested"
    )


def preset_methods(root: str | Path, name: str) -> list[str]:
    """The methods a preset holds (file stems), sorted."""
    folder = preset_dir(root, name)
    return sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []


def write_preset(path: str | Path, content: Mapping[str, Any], *, overwrite: bool) -> Path:
    """Write a preset file atomically (temporary name, then moved into place). An existing
    file is replaced only with ``overwrite``; otherwise ConfigError naming it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{path} exists: pass --overwrite to replace it, or --name another preset"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Preset {content.get('preset')}: unlearn.{content.get('method')} tuned by `unlearn tune` "
        "(select it with unlearn.preset or --preset).\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(dict(content), sort_keys=False))
    return path
