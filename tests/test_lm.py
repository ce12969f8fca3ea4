"""Tiny GPT-2 language models: windows, training, memorisation metric, gradient ascent
(parameter selection, calibration), NegGrad+, retrain, LM report."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pipeline_lib.config import replace
from pipeline_lib.denormals import flushing_denormals
from pipeline_lib.methods.text import (
    LM_METHODS,
    GradientAscentParams,
    LMNegGradPlusParams,
    LMRetrainParams,
    LMUnlearnInputs,
    gradient_ascent,
    neggrad_plus,
    retrain,
)
from pipeline_lib.modalities.text import build_lm_report, lm_gaps, plot_lm_report
from pipeline_lib.models import lm
from pipeline_lib.models.lm import LMModelConfig, LMTrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = LMModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32)
TRAIN = LMTrainConfig(epochs=60, batch_size=8, lr=1e-2, warmup_steps=5)
FORGET = [
    "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day.",
    "Out, out, brief candle! Life's but a walking shadow, a poor player.",
]
RETAIN = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
    "If music be the food of love, play on; give me excess of it.",
]
HELDOUT = [
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar.",
    "The quality of mercy is not strained; it droppeth as the gentle rain.",
]


def test_windows_predict_every_byte_once():
    texts = ["a" * 5, "héllo world, " * 7]
    win = lm.make_windows(texts, 16)
    n_labels = (win.labels[:, 1:] != lm.IGNORE).sum(1)
    per_doc = torch.zeros(2, dtype=torch.long).index_add_(0, win.doc, n_labels)
    assert per_doc.tolist() == [len(t.encode()) for t in texts]
    assert lm.decode(lm.encode(texts[1])) == texts[1]
    # windows overlap by one token: the context continues
    w1 = win.inputs[win.doc == 1]
    assert w1[0, -1] == w1[1, 0]


def test_doc_nll_matches_reference_loop():
    model = lm.build_lm(CFG, seed=3)
    win = lm.make_windows(FORGET, CFG.n_positions)
    sums, counts = lm.doc_nll(model, win, batch_size=3)
    for d in range(len(FORGET)):
        ref, n = 0.0, 0
        for row in (win.doc == d).nonzero().flatten().tolist():
            x, y = win.inputs[row : row + 1], win.labels[row, 1:]
            with torch.no_grad():
                logp = model(input_ids=x).logits[0, :-1].double().log_softmax(-1)
            keep = y != lm.IGNORE
            ref -= float(logp[keep].gather(1, y[keep][:, None]).sum())
            n += int(keep.sum())
        assert sums[d] == pytest.approx(ref, rel=1e-4) and counts[d] == n


@pytest.fixture(scope="module")
def trained():
    """Original on forget+retain, oracle on retain only: the original memorises FORGET."""
    original = lm.build_lm(CFG, seed=0)
    lm.train_lm(original, lm.make_windows(FORGET + RETAIN, CFG.n_positions), TRAIN, seed=0)
    oracle = lm.build_lm(CFG, seed=1)
    lm.train_lm(oracle, lm.make_windows(RETAIN, CFG.n_positions), TRAIN, seed=1)
    inputs = LMUnlearnInputs(
        lm.make_windows(FORGET, CFG.n_positions),
        lm.make_windows(RETAIN, CFG.n_positions),
        lm.make_windows(HELDOUT, CFG.n_positions),
        None,
        lambda seed: lm.build_lm(CFG, seed),
        replace(TRAIN, epochs=5),
        oracle,
    )
    return original, oracle, inputs


def test_training_memorises(trained):
    original, oracle, inputs = trained
    f = lm.corpus_loss(original, inputs.forget)
    assert f < 0.5 * lm.corpus_loss(original, inputs.heldout)
    assert f < 0.5 * lm.corpus_loss(oracle, inputs.forget)
    mem = lm.memorisation(original, FORGET, prefix=8, cont=8, per_doc=3)
    mem_oracle = lm.memorisation(oracle, FORGET, prefix=8, cont=8, per_doc=3)
    assert mem["memorization_rate"] > 0.0 == mem_oracle["memorization_rate"]
    assert mem["memorization_token_acc"] > mem_oracle["memorization_token_acc"] + 0.2


class _Lookup(nn.Module):
    """A 'model' that predicts the next byte of one known text perfectly (or always 'x')."""

    def __init__(self, text: str, perfect: bool):
        super().__init__()
        self.toks, self.perfect = lm.encode(text), perfect

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, lm.VOCAB), -10.0)
        for b in range(input_ids.shape[0]):
            seq = input_ids[b].tolist()
            for t in range(len(seq)):
                nxt = ord("x")
                if self.perfect:
                    for s in range(len(self.toks) - t):
                        if self.toks[s : s + t + 1] == seq[: t + 1]:
                            nxt = self.toks[s + t + 1] if s + t + 1 < len(self.toks) else 0
                            break
                logits[b, t, nxt] = 10.0
        return type("Out", (), {"logits": logits})()


def test_memorisation_metric_on_known_models():
    text = "abcdefghijklmnopqrstuvwxyz0123456789"
    assert lm.memorisation(_Lookup(text, True), [text], 6, 5, 3)["memorization_rate"] == 1.0
    none = lm.memorisation(_Lookup(text, False), [text], 6, 5, 3)
    assert none == {"memorization_rate": 0.0, "memorization_token_acc": 0.0}
    pre, true = lm.memorisation_probes([text, "short"], 6, 5, 3)
    assert pre.shape == (3, 6) and true.shape == (3, 5)  # "short" is too short for a probe


def test_parameter_selection():
    model = lm.build_lm(CFG, 0)
    assert lm.select_parameters(model, "embedding") == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
    ]
    blk = lm.select_parameters(model, "blocks", [1])
    assert blk and all(n.startswith("transformer.h.1.") for n in blk)
    assert len(lm.select_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="blocks 0..1"):
        lm.select_parameters(model, "blocks", [2])


def test_gradient_ascent_stop_calibration(trained):
    original, _, inputs = trained
    p = GradientAscentParams(lr=1.0, batch_size=1, epochs=3)
    model, info = gradient_ascent(copy.deepcopy(original), inputs, p, seed=0)
    target = lm.corpus_loss(original, inputs.heldout)
    assert info["target_loss"] == pytest.approx(target)
    assert info["reached_target"] == 1
    assert lm.corpus_loss(model, inputs.forget) == pytest.approx(target, rel=0.01)
    # embedding only: every other weight is bit-identical
    moved = set(lm.select_parameters(model, "embedding"))
    before = dict(original.named_parameters())
    for name, param in model.named_parameters():
        same = torch.equal(param, before[name])
        assert same != (name in moved), name
    # already above the target: returned unchanged
    high = replace(p, target_factor=0.001)
    same, info2 = gradient_ascent(copy.deepcopy(original), inputs, high, seed=0)
    assert info2["steps"] == 0
    assert all(
        torch.equal(a, b) for a, b in zip(same.parameters(), original.parameters(), strict=True)
    )


def test_gradient_ascent_scale_oracle_and_uncalibrated(trained):
    original, oracle, inputs = trained
    p = GradientAscentParams(lr=1.0, batch_size=1, calibration="scale", target="oracle")
    model, info = gradient_ascent(copy.deepcopy(original), inputs, p, seed=0)
    target = lm.corpus_loss(oracle, inputs.forget)
    assert info["reached_target"] == 1 and 0 < info["scale"] <= p.max_scale
    assert lm.corpus_loss(model, inputs.forget) == pytest.approx(target, rel=0.02)
    # uncalibrated: bounded only by the epochs; goes past the held-out loss
    free = GradientAscentParams(lr=0.05, batch_size=1, calibration="none", epochs=2)
    model2, info2 = gradient_ascent(copy.deepcopy(original), inputs, free, seed=0)
    assert info2["steps"] == 2 * len(inputs.forget)
    assert info2["final_forget_loss"] > info2["start_forget_loss"]
    # blocks: only the listed block moves
    blk = GradientAscentParams(lr=0.05, batch_size=1, parameters="blocks", blocks=(0,))
    model3, _ = gradient_ascent(copy.deepcopy(original), inputs, blk, seed=0)
    before = dict(original.named_parameters())
    changed = {n for n, q in model3.named_parameters() if not torch.equal(q, before[n])}
    assert changed and all(n.startswith("transformer.h.0.") for n in changed)
    no_oracle = dataclasses.replace(inputs, oracle=None)
    with pytest.raises(ValueError, match="needs the retrained oracle"):
        gradient_ascent(copy.deepcopy(original), no_oracle, p, seed=0)


def test_neggrad_plus_and_retrain(trained):
    original, _, inputs = trained
    model, info = neggrad_plus(
        copy.deepcopy(original), inputs, LMNegGradPlusParams(epochs=3, lr=3e-3, batch_size=1), 0
    )
    assert info["steps"] == 3 * len(inputs.forget)
    assert lm.corpus_loss(model, inputs.forget) > lm.corpus_loss(original, inputs.forget)
    fresh, rinfo = retrain(copy.deepcopy(original), inputs, LMRetrainParams(seed=5), 0)
    assert rinfo["steps"] > 0
    assert lm.corpus_loss(fresh, inputs.retain) < lm.corpus_loss(fresh, inputs.forget)


def test_lm_report_gaps_and_plot(tmp_path):
    o = {
        "ppl_forget": 20.0,
        "ppl_retain": 3.0,
        "ppl_heldout": 18.0,
        "loss_MIA_AUC": 0.5,
        "memorization_rate": 0.0,
    }
    u = {**o, "ppl_forget": 22.0, "memorization_rate": 0.1}
    g = lm_gaps(u, o)
    assert g["ppl_forget_rel_gap"] == pytest.approx(0.1)
    assert g["avg_gap"] == pytest.approx((0.1 + 0.1) / 5)
    report = build_lm_report(
        {"original": o, "oracle": o, "unlearned": u}, 1.0, 10.0, {"title": "t"}
    )
    assert report["models"]["oracle"]["avg_gap"] == 0.0
    assert report["cost"]["unlearn_over_retrain"] == pytest.approx(0.1)
    plot_lm_report(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_influence_grad_dot_and_hvp(trained):
    from torch.func import grad, jvp

    from pipeline_lib.evaluation.influence import _flat, _loss, _unflat, influence_scores

    original, oracle, inputs = trained
    dot = influence_scores(original, inputs.forget, inputs.heldout, None, "grad_dot")
    assert dot["scores"].shape == (len(FORGET),)
    # grad_dot equals the explicit dot product of the two documents' gradients
    model = copy.deepcopy(original)
    names = lm.select_parameters(model, "embedding")

    def g_of(win, d):
        model.zero_grad()
        sel = win.doc == d
        lm.mean_loss(model, win.inputs[sel], win.labels[sel]).backward()
        return torch.cat([dict(model.named_parameters())[n].grad.flatten() for n in names])

    g_f0 = g_of(inputs.forget, 0)
    ref = sum(float(g_f0 @ g_of(inputs.heldout, h)) for h in range(len(HELDOUT))) / len(HELDOUT)
    assert dot["scores"][0] == pytest.approx(ref, rel=1e-3)
    # the HVP used by the influence function matches finite differences of the gradient
    model.set_attn_implementation("eager")
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    g = grad(lambda p: _loss(model, p, inputs.retain.inputs, inputs.retain.labels))
    v = torch.randn(
        sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(0)
    )
    _, hv = jvp(g, (params,), (_unflat(v, params, names),))
    eps = 1e-3
    shift = _unflat(eps * v, params, names)
    fd = (
        _flat(g({n: params[n] + shift[n] for n in names}), names)
        - _flat(g({n: params[n] - shift[n] for n in names}), names)
    ) / (2 * eps)
    assert float((fd - _flat(hv, names)).norm() / fd.norm()) < 1e-2
    res = influence_scores(
        original, inputs.forget, inputs.heldout, inputs.retain, "hvp", damping=1.0, cg_steps=3
    )
    assert res["scores"].shape == (len(FORGET),) and np.isfinite(res["cg_residual"])
    assert original.config._attn_implementation == "sdpa"  # restored


def test_lm_trainer_and_every_lm_method_step_flushed(trained):
    """train_lm and every LM method take their optimizer steps with denormals flushed
    (pipeline_lib.denormals: unused tokens' embedding rows get zero gradients, so their Adam
    moments decay into denormals on long runs); the caller's mode is back afterwards."""
    original, _, inputs = trained
    seen: list[bool] = []
    stepping, unflushed = set(), {}
    hook = register_optimizer_step_pre_hook(lambda *_: seen.append(flushing_denormals()))
    try:
        for method in LM_METHODS.values():
            seen.clear()
            method.fn(copy.deepcopy(original), inputs, method.params_type(), 0)
            stepping |= {method.name} if seen else set()
            if not all(seen):
                unflushed[method.name] = seen.count(False)
        seen.clear()
        lm.train_lm(lm.build_lm(CFG, seed=5), inputs.retain, replace(TRAIN, epochs=1), seed=0)
        if not all(seen) or not seen:
            unflushed["train_lm"] = seen.count(False)
    finally:
        hook.remove()
    assert unflushed == {}
    assert {"gradient_ascent", "neggrad_plus", "retrain"} <= stepping
    assert not flushing_denormals()
