"""Entry points of the DVC stages: ``prepare`` and ``extract``, for either modality.

``python -m pipeline_lib.stages prepare --params params.yaml [--out DIR] [--exclude IDS.parquet]``
writes the prepared data (``data.out_dir``, or ``--out``); ``--exclude`` names a purge list
(a Parquet table with a ``sample_id`` column): those rows (documents) are left out.

``python -m pipeline_lib.stages extract --params params.yaml`` resolves ``request.file``
against it and writes the id manifests to ``request.out_dir`` (the root ``dvc.yaml``, for a
hand-run ``dvc repro``). The pipeline runs the per-request form, whose stage file and lock
live in the request's own run directory, so two requests never share an output::

    python -m pipeline_lib.stages extract --prepared DIR --request FILE --out DIR \\
        [--exclude TOMBSTONES.parquet]

``--exclude`` names a tombstone set: ids forgotten by earlier requests are taken out of the
retain set (and out of the forget set: they are gone already).
The Prefect flows run these through ``dvc repro``, so a flow and a hand-run ``dvc repro``
produce the same outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline_lib.config import ConfigError, load_params
from pipeline_lib.data.images import load_prepared, prepare_dataset
from pipeline_lib.data.requests import (
    RequestError,
    extract_forget_set,
    load_request,
    write_manifests,
)

log = logging.getLogger(__name__)

#: (request, prepared dir) -> (forget ids, retain ids, data meta)
Extractor = Callable[[Any, str], tuple[np.ndarray, np.ndarray, dict]]


def run_prepare(params_path: str, out: str | None = None, exclude: str | None = None) -> dict:
    params = load_params(params_path)
    return prepare_dataset(params.data, out, read_purged_ids(exclude) if exclude else None)


def read_purged_ids(path: str | Path) -> list[str]:
    """The ``sample_id`` column of a purge list (ids whose rows ``prepare --exclude`` drops)."""
    import pyarrow.parquet as pq

    return [str(s) for s in pq.read_table(path, columns=["sample_id"]).column(0).to_pylist()]


def extract_images(request: Any, prepared_dir: str) -> tuple[np.ndarray, np.ndarray, dict]:
    data = load_prepared(prepared_dir)
    forget, retain = extract_forget_set(request, data)
    return forget, retain, data.meta


def run_extract(params_path: str) -> dict:
    params = load_params(params_path)
    return extract_to(
        extract_images, params.data.out_dir, params.request.file, params.request.out_dir
    )


def extract_to(
    extract: Extractor,
    prepared_dir: str,
    request_file: str,
    out_dir: str,
    exclude: str | None = None,
) -> dict:
    """Resolve the request against the prepared data, less the tombstones in ``exclude``;
    write the manifests to ``out_dir`` (atomically). Returns the manifest summary."""
    request = load_request(request_file)
    forget, retain, meta = extract(request, prepared_dir)
    n_already = 0
    if exclude:
        from pipeline_lib.service.tombstones import read_tombstones, tombstoned_ids

        gone = tombstoned_ids(read_tombstones(exclude))
        keep_f = ~np.isin(forget, gone)
        n_already = int((~keep_f).sum())
        forget, retain = forget[keep_f], retain[~np.isin(retain, gone)]
        if len(forget) == 0:
            raise RequestError(
                f"{request_file}: every id of the request was forgotten by an earlier request"
            )
    summary = write_manifests(out_dir, request, forget, retain, meta)
    if exclude:
        summary = _add_to_summary(out_dir, {"n_already_forgotten": n_already})
    log.info("request %s: %d forget, %d retain", request.request_id, len(forget), len(retain))
    return summary


def _add_to_summary(out_dir: str, extra: dict) -> dict:
    import json

    from pipeline_lib.io import write_json

    path = Path(out_dir) / "request.json"
    summary = {**json.loads(path.read_text()), **extra}
    write_json(path, summary)
    return summary


def stage_main(
    prog: str,
    default_params: str,
    prepare: Callable[..., dict],
    extract_params: Callable[[str], dict],
    extract: Extractor,
    argv: list[str] | None = None,
) -> int:
    """Command line of a DVC stage module (see the module docstring); input errors print one
    line and exit 2. Shared by the image and the text stages."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("stage", choices=["prepare", "extract"])
    parser.add_argument("--params", default=default_params)
    parser.add_argument("--out", help="output directory (default: from the params file)")
    parser.add_argument("--prepared", help="extract: the prepared data directory")
    parser.add_argument("--request", help="extract: the request file")
    parser.add_argument(
        "--exclude",
        help="extract: a tombstone set (Parquet) to leave out; prepare: a purge list of ids",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.stage == "prepare" and args.exclude:
            prepare(args.params, args.out, args.exclude)
        elif args.stage == "prepare":
            prepare(args.params, args.out)
        elif args.request:
            if not (args.prepared and args.out):
                raise ConfigError("extract --request needs --prepared and --out")
            extract_to(extract, args.prepared, args.request, args.out, args.exclude)
        else:
            extract_params(args.params)
    except (ConfigError, RequestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "python -m pipeline_lib.stages",
        "params.yaml",
        run_prepare,
        run_extract,
        extract_images,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
