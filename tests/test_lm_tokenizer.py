"""The tokenizer path of the LM code: windows, per-document losses and memorisation probes
with a subword tokenizer (trained here with the `tokenizers` library, nothing downloaded)
behave as with bytes; the SmolLM2 loader fails clearly when its file is missing. The real
SmolLM2-135M is exercised by the slow test at the end (`make install-smollm` first)."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.config.text import LMModelConfig
from pipeline_lib.models import lm

TEXTS = [
    "When shall we three meet again in thunder, lightning, or in rain?",
    "When the hurlyburly's done, when the battle's lost and won.",
    "Fair is foul, and foul is fair: hover through the fog and filthy air.",
    "So foul and fair a day I have not seen.",
]


@pytest.fixture(scope="module")
def subword() -> lm.HFTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "<unk>"], show_progress=False
    )
    raw.train_from_iterator(TEXTS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", pad_token="<pad>", unk_token="<unk>"
    )
    return lm.HFTokenizer(fast, name="bpe-test")


def test_bytes_is_the_default_tokenizer():
    assert lm.tokenizer_for(LMModelConfig()) is lm.BYTES
    win = lm.make_windows(TEXTS, 16)
    assert torch.equal(win.inputs, lm.make_windows(TEXTS, 16, lm.BYTES).inputs)
    assert lm.BYTES.decode(lm.BYTES.encode(TEXTS[0])) == TEXTS[0]


def test_subword_windows_predict_every_token_once(subword):
    toks = [subword.encode(t) for t in TEXTS]
    assert all(t[0] == subword.bos for t in toks)
    assert max(map(len, toks)) < max(len(t.encode()) for t in TEXTS)  # subwords, not bytes
    assert subword.decode(toks[2]) == TEXTS[2]
    win = lm.make_windows(TEXTS, 8, subword)
    assert win.inputs.max() < subword.vocab_size
    labelled = (win.labels[:, 1:] != lm.IGNORE).sum(1)
    per_doc = torch.zeros(len(TEXTS), dtype=torch.long).index_add_(0, win.doc, labelled)
    assert per_doc.tolist() == [len(t) - 1 for t in toks]
    last = win.inputs[-1]  # the last window of the last document ends in padding
    assert (last[(win.labels[-1] == lm.IGNORE) & (torch.arange(8) > 0)] == subword.pad).all()
    # doc_nll sums exactly those tokens, with a model whose vocabulary is the tokenizer's
    model = lm.build_gpt2(LMModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=8), 0)
    model.resize_token_embeddings(subword.vocab_size)
    _, counts = lm.doc_nll(model, win)
    assert counts.tolist() == [len(t) - 1 for t in toks]


def test_subword_memorisation_probes(subword):
    pre, true = lm.memorisation_probes(TEXTS, 4, 3, 2, subword)
    assert pre.shape[1] == 4 and true.shape[1] == 3 and len(pre) > 0
    assert (pre[:, 0] == subword.bos).any()  # the first probe of a document starts at BOS
    # a probe's prefix and continuation are consecutive tokens of some document
    docs = [subword.encode(t) for t in TEXTS]
    for p, t in zip(pre.tolist(), true.tolist(), strict=True):
        assert any(d[i : i + 7] == p + t for d in docs for i in range(len(d) - 6)), (p, t)


def test_smollm2_missing_file_is_a_clear_error(tmp_path):
    from pipeline_lib.models.pretrained import gguf_path

    cfg = LMModelConfig(kind="smollm2", gguf=str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="lm.gguf: no such file"):
        gguf_path(cfg)


@pytest.mark.slow
def test_smollm2_loads_from_gguf_then_from_cache(tmp_path):
    """The real SmolLM2-135M: GGUF → safetensors cache → the same weights on the second
    load; its tokenizer round-trips Shakespeare, and it predicts English far better than
    chance."""
    import math

    from pipeline_lib.models.pretrained import WEIGHTS, ensure_cache

    cfg = LMModelConfig(kind="smollm2", n_positions=64, cache_dir=str(tmp_path))
    first = lm.build_lm(cfg, 0)
    cache = ensure_cache(cfg)
    assert (cache / WEIGHTS).is_file() and (cache / "config.json").is_file()
    second = lm.build_lm(cfg, 1)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = lm.tokenizer_for(cfg)
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    s, c = lm.doc_nll(second, lm.make_windows(TEXTS, 64, tok))
    # measured 221 on these four lines (uniform guessing: 49,152)
    assert math.exp(s.sum() / c.sum()) < 1000 < tok.vocab_size / 40
