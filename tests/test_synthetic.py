"""The synthetic suite: every family verifiable, disjoint splits, imperfect SFT, rule judge."""

import collections

import numpy as np
import pytest

from xwin_jax.data import formats, synthetic
from xwin_jax.data.synthetic import RuleJudge


def test_every_family_solves_its_own_prompts():
    rng = np.random.default_rng(0)
    for family in synthetic.FAMILIES:
        for _ in range(20):
            prompt = family.make(rng)
            name, answer = synthetic.solve(prompt)
            assert name == family.name and answer
    assert len(synthetic.FAMILIES) >= 6
    assert synthetic.solve("What is 12 * 3?") == ("arithmetic", "36")
    assert synthetic.solve("Sort these numbers in ascending order: 9, 1, 40.")[1] == "1, 9, 40"
    assert synthetic.solve("Reverse the letters of the word 'tiger'.")[1] == "regit"
    assert synthetic.solve("How many times does the letter 'a' appear in the word "
                           "'banana'?")[1] == "3"
    assert synthetic.solve("Tell me a joke.") is None


def test_rule_judge_scores_correctness_then_concision():
    judge = RuleJudge()
    prompt = "What is 40 + 2?"
    assert judge.rate(prompt, "The answer is 42.").score == 10
    verbose = judge.rate(prompt, f"{synthetic.FILLERS[0]} The answer is 42. {synthetic.FILLERS[3]}")
    assert verbose.correct and 6 <= verbose.score < 10
    wrong = judge.rate(prompt, "The answer is 41.")
    assert not wrong.correct and wrong.score in (2, 3) and "expected '42'" in wrong.reason
    assert judge.rate(prompt, "forty-two, probably").score == 1
    verdict = judge.compare(prompt, "The answer is 41.", "The answer is 42.")
    assert verdict == {"better": "B", "rating_a": 3, "rating_b": 10, "margin": 7,
                       "reason": verdict["reason"]}
    with pytest.raises(ValueError, match="cannot verify"):
        judge.rate("Write a poem.", "Roses.")


def test_suite_files_are_deterministic_disjoint_and_readable(tmp_path):
    paths = synthetic.write_suite(str(tmp_path / "a"), seed=3, num_prompts=700)
    again = synthetic.write_suite(str(tmp_path / "b"), seed=3, num_prompts=700)
    for name in paths:
        assert open(paths[name]).read() == open(again[name]).read(), name
    splits = {s: {p.text for p in formats.read_prompts(paths[f"prompts_{s}"])}
              for s in synthetic.SPLITS}
    assert sum(map(len, splits.values())) == 700
    assert not (splits["train"] & splits["valid"]) and not (splits["train"] & splits["test"])
    assert not (splits["valid"] & splits["test"])
    assert 40 < len(splits["test"]) < 110  # ~10%

    sft = formats.read_sft(paths["sft_train"]).records
    assert {c.turns[0].content for c in sft} == splits["train"]
    judge = RuleJudge()
    ratings = [judge.rate(c.turns[0].content, c.turns[1].content) for c in sft]
    wrong = np.mean([not r.correct for r in ratings])
    verbose = np.mean([r.correct and r.score < 10 for r in ratings])
    assert 0.2 < wrong < 0.4 and 0.1 < verbose < 0.35  # the configured imperfection
    families = collections.Counter(synthetic.solve(c.turns[0].content)[0] for c in sft)
    assert len(families) == len(synthetic.FAMILIES)

    pairs = formats.read_pairs(paths["pairs_train"]).records
    assert pairs and all(p.chosen_rating > p.rejected_rating for p in pairs)
    assert all(judge.rate(p.prompt.messages[-1].content, p.chosen).score == p.chosen_rating
               for p in pairs)
