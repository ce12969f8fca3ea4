"""Entry points of the DVC stages (``dvc.yaml``): ``prepare`` and ``extract``.

``python -m pipeline_lib.stages prepare --params params.yaml`` writes ``data.out_dir``;
``python -m pipeline_lib.stages extract --params params.yaml`` resolves ``request.file``
against it and writes the id manifests to ``request.out_dir``. The Prefect flow runs these
through ``dvc repro``, so the flow and a hand-run ``dvc repro`` produce the same outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline_lib.config import ConfigError, load_params
from pipeline_lib.data.images import load_prepared, prepare_dataset
from pipeline_lib.data.requests import (
    RequestError,
    extract_forget_set,
    load_request,
    write_manifests,
)


def run_prepare(params_path: str) -> dict:
    params = load_params(params_path)
    return prepare_dataset(params.data)


def run_extract(params_path: str) -> dict:
    params = load_params(params_path)
    request = load_request(params.request.file)
    data = load_prepared(params.data.out_dir)
    forget, retain = extract_forget_set(request, data)
    summary = write_manifests(params.request.out_dir, request, forget, retain, data.meta)
    logging.getLogger(__name__).info(
        "request %s: %d forget, %d retain", request.request_id, len(forget), len(retain)
    )
    return summary


def stage_main(
    prog: str,
    default_params: str,
    prepare: Callable[[str], dict],
    extract: Callable[[str], dict],
    argv: list[str] | None = None,
) -> int:
    """Command line of a DVC stage module: ``prepare|extract --params FILE``; input errors
    print one line and exit 2. Shared by the image and the text stages."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("stage", choices=["prepare", "extract"])
    parser.add_argument("--params", default=default_params)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (prepare if args.stage == "prepare" else extract)(args.params)
    except (ConfigError, RequestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "python -m pipeline_lib.stages", "params.yaml", run_prepare, run_extract, argv
    )


if __name__ == "__main__":
    sys.exit(main())
