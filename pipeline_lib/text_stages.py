"""Entry points of the LM pipeline's DVC stages (``lm/dvc.yaml`` and the per-request stage
files): ``prepare`` and ``extract``, with the command line of :mod:`pipeline_lib.stages`.

``python -m pipeline_lib.text_stages prepare --params params-lm.yaml [--out DIR]`` writes the
prepared corpus (default ``data/text/prepared``); ``extract --params params-lm.yaml``
resolves ``request.file`` against it and writes the id manifests to ``data/text/forget``;
``extract --prepared DIR --request FILE --out DIR [--exclude T]`` is the per-request form.
"""

from __future__ import annotations

import sys

import numpy as np

from pipeline_lib.config.text import load_lm_params
from pipeline_lib.data.text import (
    MANIFESTS_DIR,
    PREPARED_DIR,
    extract_forget_docs,
    load_corpus,
    prepare_corpus,
)
from pipeline_lib.stages import extract_to, read_purged_ids, stage_main


def run_prepare(params_path: str, out: str | None = None, exclude: str | None = None) -> dict:
    params = load_lm_params(params_path)
    drop = read_purged_ids(exclude) if exclude else None
    return prepare_corpus(params.text, out or PREPARED_DIR, drop)


def extract_docs(request, prepared_dir: str) -> tuple[np.ndarray, np.ndarray, dict]:
    corpus = load_corpus(prepared_dir)
    forget, retain = extract_forget_docs(request, corpus)
    return np.asarray(forget), np.asarray(retain), corpus.meta


def run_extract(params_path: str) -> dict:
    params = load_lm_params(params_path)
    return extract_to(extract_docs, PREPARED_DIR, params.request.file, MANIFESTS_DIR)


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "python -m pipeline_lib.text_stages",
        "params-lm.yaml",
        run_prepare,
        run_extract,
        extract_docs,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
