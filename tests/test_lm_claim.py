"""benchmarks/lm_smollm2_claim.py (issue 16): the document split it searches and reports on,
the claim's objective, and (slow) a --quick end-to-end run on the tiny GPT-2 with Ray Tune."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from benchmarks import lm_smollm2_claim as claim
from pipeline_lib.data.text import TextConfig, load_shakespeare


def test_objective_is_at_most_one_exactly_when_the_claim_holds():
    assert claim.objective(1.09, 1.0, 0.049) <= 1
    assert claim.objective(0.91, 1.0, -0.049) <= 1
    assert claim.objective(1.2, 1.0, 0.0) == pytest.approx(2.0)
    assert claim.objective(1.0, 1.0, 0.06) > 1
    assert claim.objective(0.85, 1.0, 0.0) > 1


def test_forget_sets_are_disjoint_training_scenes_and_held_out_scenes_are_unseen():
    raw = load_shakespeare(TextConfig(plays=None))
    texts = list(raw.texts)
    args = argparse.Namespace(seed=3, train_per_play=5, forget=4)
    sel = claim.pick_docs(texts, raw.groups, args)
    train = set(sel["train"])
    fv, ft = set(sel["forget_val"]), set(sel["forget_test"])
    assert len(fv) == len(ft) == 4 and not fv & ft
    assert fv <= train and ft <= train
    held = set(sel["held_val"]) | set(sel["held_test"])
    assert len(held) == len(sel["held_val"]) + len(sel["held_test"]) and not held & train
    plays = set(raw.groups.tolist())
    # one validation and one report held-out scene per play, train_per_play scenes each
    assert len(sel["held_val"]) == len(plays) == len(set(raw.groups[sel["held_val"]].tolist()))
    assert set(Counter(raw.groups[sel["train"]].tolist()).values()) == {5}
    # seeded: the same seed picks the same scenes, another seed other forget scenes
    assert claim.pick_docs(texts, raw.groups, args) == sel
    other = claim.pick_docs(
        texts, raw.groups, argparse.Namespace(seed=4, train_per_play=5, forget=4)
    )
    assert other["forget_test"] != sel["forget_test"]


@pytest.mark.slow
def test_quick_run_on_the_tiny_gpt2_searches_and_reports(tmp_path, capsys):
    claim.main(["--quick", "--kind", "gpt2", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "result.json").read_text())
    trials = res["trials"]
    assert sorted(t["config"]["parameters"] for t in trials) == sorted(claim.CHOICES)
    assert all(t["error"] is None for t in trials)
    for t in trials:
        m = t["metrics"]
        assert m["objective"] == pytest.approx(
            claim.objective(
                m["ppl_forget"], m["ppl_forget"] / m["ratio_to_oracle"], m["heldout_change"]
            )
        )
    assert len(res["test"]) == len(claim.CHOICES)
    assert "| oracle (fine-tuned without the forget scenes) |" in out
    assert "claim (forget ppl within" in out


def test_gradient_ascent_declares_a_checked_search_space():
    from pipeline_lib.methods.space import Choice, LogUniform
    from pipeline_lib.methods.text import (
        GradientAscentParams,
        get_lm_method,
        register_lm_method,
    )

    space = get_lm_method("gradient_ascent").search_space
    assert isinstance(space["lr"], LogUniform) and isinstance(space["parameters"], Choice)
    # every corner of the space is a valid section (blocks listed for parameters: blocks)
    for lr in (space["lr"].low, space["lr"].high):
        for which in space["parameters"].values:
            p = GradientAscentParams(lr=lr, parameters=which, blocks=(0,))
            assert p.lr == lr and p.parameters == which
    with pytest.raises(ValueError, match="not a field of unlearn.bogus"):
        register_lm_method("bogus", GradientAscentParams, "x", search_space={"nope": space["lr"]})
    assert get_lm_method("neggrad_plus").search_space == {}
