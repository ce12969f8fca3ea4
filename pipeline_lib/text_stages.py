"""Entry points of the LM pipeline's DVC stages (``lm/dvc.yaml``): ``prepare`` and ``extract``.

``python -m pipeline_lib.text_stages prepare --params params-lm.yaml`` writes the prepared
corpus to ``data/text/prepared``; ``extract`` resolves ``request.file`` against it and writes
the id manifests to ``data/text/forget``. The LM flow runs these through ``dvc repro``.
"""

from __future__ import annotations

import logging
import sys

from pipeline_lib.config.text import load_lm_params
from pipeline_lib.data.requests import load_request, write_manifests
from pipeline_lib.data.text import (
    MANIFESTS_DIR,
    PREPARED_DIR,
    extract_forget_docs,
    load_corpus,
    prepare_corpus,
)
from pipeline_lib.stages import stage_main


def run_prepare(params_path: str) -> dict:
    params = load_lm_params(params_path)
    return prepare_corpus(params.text, PREPARED_DIR)


def run_extract(params_path: str) -> dict:
    params = load_lm_params(params_path)
    request = load_request(params.request.file)
    corpus = load_corpus(PREPARED_DIR)
    forget, retain = extract_forget_docs(request, corpus)
    summary = write_manifests(MANIFESTS_DIR, request, forget, retain, corpus.meta)
    logging.getLogger(__name__).info(
        "request %s: %d forget, %d retain documents", request.request_id, len(forget), len(retain)
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "python -m pipeline_lib.text_stages", "params-lm.yaml", run_prepare, run_extract, argv
    )


if __name__ == "__main__":
    sys.exit(main())
