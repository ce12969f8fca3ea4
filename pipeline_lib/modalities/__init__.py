"""Modalities: what the one unlearning pipeline needs to know about a kind of data.

The pipeline (``flows/pipeline.py``) is written once; a :class:`Modality` plugs in the
data-specific parts: which params file and DVC stages it uses, how a request is checked
against the prepared data, how a model is trained, unlearned and evaluated, and how the
report is printed. ``image`` (digits, Fashion-MNIST, Parquet tables; classifiers) and
``text`` (text corpora; causal language models) are the two registered today. A new modality
is a module under this package that defines ``MODALITY`` and one entry in
:data:`MODALITY_MODULES`; the two modules never import each other.

The modules are imported lazily, so the image pipeline does not pay for importing the
language-model stack and vice versa.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.config import ConfigError, read_params_file

#: modality name -> module that defines ``MODALITY``.
MODALITY_MODULES: dict[str, str] = {
    "image": "pipeline_lib.modalities.image",
    "text": "pipeline_lib.modalities.text",
}

#: The ``pipeline:`` key of a params file names its modality; ``lm`` is the historical name
#: of ``text`` (params-lm.yaml says ``pipeline: lm``); no key means ``image``.
PIPELINE_KEYS: dict[str, str] = {"image": "image", "lm": "text", "text": "text"}


@dataclass(frozen=True)
class Modality:
    """The data-specific parts of the pipeline. Every callable is plain (no orchestration):
    the tasks call them with paths and config dicts and return small dicts of paths and
    numbers, so their results can be cached as JSON.

    ``data`` arguments are the dicts the flow builds: ``prepared_dir`` (+ ``manifests_dir``
    for request-specific work) and their DVC md5s.
    """

    name: str
    #: value of the MLflow ``pipeline`` tag (``image`` | ``lm``).
    tag: str
    #: default params file and the DVC stage file / lock its stages live in (DVC-root relative).
    params_file: str
    dvc_file: str
    lock_file: str
    #: params sections synced into the params file before ``prepare`` runs.
    data_sections: tuple[str, ...]
    #: the section holding the architecture (``model`` | ``lm``).
    model_section: str
    #: ``load_params(path, overrides) -> params``; validates everything, raises ConfigError.
    load_params: Callable[..., Any]
    #: DVC-root-relative outs of the prepare and extract stages for these params.
    prepared_out: Callable[[Any], str]
    manifests_out: Callable[[Any], str]
    #: ``get_method(name) -> method`` of this modality's registry (unknown name: ConfigError).
    get_method: Callable[[str], Any]
    #: which extra inputs a method needs: a subset of {"fisher", "store", "oracle"}.
    method_needs: Callable[[Any, Any], frozenset[str]]
    #: ``extract(request, prepared_dir) -> (forget ids, retain ids, data meta)``: the request
    #: resolved against the prepared data (RequestError naming the problem if it does not fit).
    extract: Callable[[Any, str], tuple[Any, Any, Mapping[str, Any]]]
    #: the (model, train, unlearn) section classes the steps take.
    configs: tuple[type, type, type]
    #: ``load_splits(prepared_dir, manifests_dir) -> splits`` (forget, retain, test).
    load_splits: Callable[[str, str], Any]
    #: ``train_step(prepared_dir, manifests_dir | None, role, model_cfg, train_cfg, seed,
    #: out_dir) -> {path, digest, seconds, ...}``: the original (no manifests) or a model of
    #: the retain set.
    train_step: Callable[..., dict[str, Any]]
    #: ``unlearn_step(splits, weights_path, model_cfg, train_cfg, unlearn_cfg, out_dir,
    #: **unlearn_kwargs(extras, sections)) -> {path, digest, seconds, info, method}``.
    unlearn_step: Callable[..., dict[str, Any]]
    unlearn_kwargs: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    #: ``evaluate_step(splits, params, weights, unlearn_s, retrain_s, report_dir, extra)``.
    evaluate_step: Callable[..., dict[str, Any]]
    #: ``lineage_table(prepared_dir) -> (ids table, dataset name, content hash, id column)``.
    lineage_table: Callable[[str], tuple[Any, str, str, str]]
    #: plain-text summary table of a report; its columns and digits for markdown.
    format_table: Callable[[Mapping], str]
    summary_columns: tuple[str, ...]
    digits: int
    #: one log line summarising a finished run's report.
    summary_line: Callable[[Mapping], str]

    #: the module whose ``prepare`` / ``extract`` commands the DVC stages run.
    stage_module: str = "pipeline_lib.stages"
    #: further sections the unlearning step reads (they key its cache).
    unlearn_reads: tuple[str, ...] = ()

    def _parsed(self, sections: dict[str, Any]) -> tuple[Any, Any]:
        from pipeline_lib.config import parse_section

        model_cls, train_cls, _ = self.configs
        return parse_section(model_cls, sections["model"]), parse_section(
            train_cls, sections["train"]
        )

    def train(
        self, data: dict[str, str], role: str, sections: dict[str, Any], seed: int, out_dir: str
    ) -> dict[str, Any]:
        """Train a model: the original (``data`` without manifests) or one of the retain set."""
        model_cfg, train_cfg = self._parsed(sections)
        return self.train_step(
            data["prepared_dir"],
            data.get("manifests_dir"),
            role,
            model_cfg,
            train_cfg,
            seed,
            out_dir,
        )

    def unlearn(
        self,
        data: dict[str, str],
        weights_path: str,
        sections: dict[str, Any],
        extras: dict[str, Any],
        out_dir: str,
    ) -> dict[str, Any]:
        """Apply ``sections['unlearn']``'s method to the weights at ``weights_path``."""
        from pipeline_lib.config import parse_section

        model_cfg, train_cfg = self._parsed(sections)
        return self.unlearn_step(
            self.load_splits(data["prepared_dir"], data["manifests_dir"]),
            weights_path,
            model_cfg,
            train_cfg,
            parse_section(self.configs[2], sections["unlearn"]),
            out_dir,
            **self.unlearn_kwargs(extras, sections),
        )

    def evaluate(
        self,
        data: dict[str, str],
        params: Any,
        weights: dict[str, str],
        unlearn_seconds: float,
        retrain_seconds: float,
        report_dir: str,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Metrics of the models in ``weights``; the report (written to ``report_dir``)."""
        return self.evaluate_step(
            self.load_splits(data["prepared_dir"], data["manifests_dir"]),
            params,
            weights,
            unlearn_seconds,
            retrain_seconds,
            Path(report_dir),
            extra,
        )

    def check_request(self, request: Any, prepared_dir: str) -> tuple[int, int]:
        """(n_forget, n_retain) of ``request`` on the prepared data; RequestError if bad."""
        forget, retain, _ = self.extract(request, prepared_dir)
        return len(forget), len(retain)

    def train_sections(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """What training reads of ``to_dict(params)``: the architecture and the trainer."""
        return {"model": cfg[self.model_section], "train": cfg["train"]}

    def unlearn_sections(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """What unlearning reads of ``to_dict(params)``."""
        return {
            **self.train_sections(cfg),
            "unlearn": cfg["unlearn"],
            **{k: cfg[k] for k in self.unlearn_reads},
        }


def get_modality(name: str) -> Modality:
    """The registered modality ``name``; an unknown name lists the valid ones."""
    if name not in MODALITY_MODULES:
        raise ConfigError(
            f"pipeline: unknown modality {name!r}; valid: {', '.join(sorted(MODALITY_MODULES))}"
        )
    return importlib.import_module(MODALITY_MODULES[name]).MODALITY


def modality_name_of(raw: Mapping[str, Any], source: str = "params") -> str:
    """The modality a raw params mapping declares with ``pipeline:`` (default ``image``)."""
    key = raw.get("pipeline", "image")
    if key not in PIPELINE_KEYS:
        raise ConfigError(
            f"{source}: pipeline: unknown value {key!r}; valid: {', '.join(sorted(PIPELINE_KEYS))}"
        )
    return PIPELINE_KEYS[key]


def modality_for_params(path: str | Path) -> Modality:
    """The modality of a params file (its ``pipeline:`` key)."""
    return get_modality(modality_name_of(read_params_file(path), str(path)))
