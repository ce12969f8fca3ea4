"""``unlearn run`` for the language-model pipeline: chosen when the params file says
``pipeline: lm`` (``unlearn run --params params-lm.yaml --request requests/forget-play.yaml``)."""

from __future__ import annotations

import argparse
import os

from pipeline_lib.config.text import environment_overrides, load_lm_params
from pipeline_lib.data.requests import load_request


def cmd_run_lm(args: argparse.Namespace) -> int:
    from flows.cli import _overrides, _setup_env

    overrides = _overrides(args)
    params = load_lm_params(args.params, {**environment_overrides(os.environ), **overrides})
    load_request(params.resolve(params.request.file))  # schema check before any work
    _setup_env()
    from flows.lm_pipeline import lm_unlearning_pipeline  # prefect import after env setup
    from pipeline_lib.modalities.text import format_lm_table

    result = lm_unlearning_pipeline(params_path=args.params, overrides=overrides)
    print()
    print(format_lm_table(result["report"]))
    print(
        f"\nMLflow run {result['run_id']} ({params.tracking.mlflow_uri}); report in {result['report_dir']}"
    )
    return 0
