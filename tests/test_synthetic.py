"""The synthetic suite: every family verifiable, disjoint splits, imperfect SFT, rule judge."""

import collections
import json

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
    assert synthetic.solve("Repeat exactly: 'qzxa'.") == ("copy", "qzxa")
    assert synthetic.solve("Write in uppercase: 'qzxa'.")[1] == "QZXA"
    assert synthetic.solve("Give the last letter of: 'qzxa'.") == ("last_letter", "a")
    assert synthetic.solve("Is 317 even or odd?") == ("parity", "odd")
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
    ratings = [judge.rate(c.turns[0].content, c.turns[1].content) for c in sft
               if len(c.turns) == 2]
    wrong = np.mean([not r.correct for r in ratings])
    verbose = np.mean([r.correct and r.score < 10 for r in ratings])
    assert 0.2 < wrong < 0.4 and 0.1 < verbose < 0.35  # the configured imperfection
    families = collections.Counter(synthetic.solve(c.turns[0].content)[0] for c in sft)
    assert len(families) == len(synthetic.FAMILIES)

    pairs = formats.read_pairs(paths["pairs_train"]).records
    assert pairs and all(p.chosen_rating > p.rejected_rating for p in pairs)
    assert all(judge.rate(p.prompt, p.chosen).score == p.chosen_rating for p in pairs)
    assert all(judge.rate(p.prompt, p.rejected).score == p.rejected_rating for p in pairs)


# --- multi-turn items -----------------------------------------------------------------------

def _conversation(*texts):
    return formats.Conversation(tuple(formats.Message("user" if i % 2 == 0 else "assistant", t)
                                      for i, t in enumerate(texts)))


def test_follow_ups_are_judged_against_the_correct_earlier_answer():
    judge = RuleJudge()
    # Turn 1: 12 * 3 = 36. The follow-up's correct answer is "63", whatever the assistant
    # answered before: a follow-up that is right for a wrong earlier answer (37 → 73) is wrong.
    for earlier in ("The answer is 36.", "The answer is 37."):
        prompt = _conversation("What is 12 * 3?", earlier, "Reverse your answer.")
        assert synthetic.solve_conversation(prompt) == ("arithmetic+reverse", "63")
        assert judge.rate(prompt, "The answer is 63.").score == 10
        wrong = judge.rate(prompt, "The answer is 73.")
        assert not wrong.correct and wrong.score == 3 and "expected '63'" in wrong.reason
    messages = formats.messages_to_json(_conversation(
        "Repeat exactly: 'egit'.", "The answer is tige.",
        "Now write your answer in uppercase.").messages)  # the messages of a pairs file
    verdict = judge.compare(messages, "The answer is TIGE.", "The answer is EGIT.")
    assert (verdict["better"], verdict["rating_a"], verdict["rating_b"]) == ("B", 3, 10)
    # Follow-ups chain, a new question starts over, and an unknown question is not verified.
    chained = _conversation("Is 7 even or odd?", "odd", "Reverse your answer.", "ddo",
                            "What is the first character of your answer?")
    assert synthetic.solve_conversation(chained) == ("parity+reverse+first_character", "d")
    fresh = _conversation("Tell me a joke.", "No.", "What is 40 + 2?")
    assert synthetic.solve_conversation(fresh) == ("arithmetic", "42")
    with pytest.raises(ValueError, match=r"cannot verify .*'Reverse your answer\.' \(after 1"):
        judge.rate(_conversation("Tell me a joke.", "No.", "Reverse your answer."), "x")
    with pytest.raises(ValueError, match="cannot verify"):
        judge.rate("Reverse your answer.", "The answer is x.")  # nothing to follow up on


def test_the_suite_has_a_modest_share_of_multi_turn_items_in_the_users_formats(tmp_path):
    from xwin_jax.data import template
    from xwin_jax.data.vocabulary import ByteVocabulary

    paths = synthetic.write_suite(str(tmp_path), seed=3, num_prompts=700)
    judge = RuleJudge()
    for split in synthetic.SPLITS:  # the prompts_* files stay single-turn
        assert all(len(p.conversation.messages) == 1
                   for p in formats.read_prompts(paths[f"prompts_{split}"]))
        records = [json.loads(line) for line in open(paths[f"prompts_multiturn_{split}"])]
        prompts = formats.read_prompts(paths[f"prompts_multiturn_{split}"]).records
        assert len(prompts) > 0.6 * len(formats.read_prompts(paths[f"prompts_{split}"]))
        first_turns = {p.conversation.messages[0].content for p in prompts}
        assert first_turns <= {p.text for p in formats.read_prompts(paths[f"prompts_{split}"])}
        for record, prompt in zip(records, prompts):
            user, earlier, follow_up = prompt.conversation.messages
            assert earlier.content == synthetic.ideal_response(synthetic.solve(user.content)[1])
            assert synthetic.follow_up_of(follow_up.content).name == record["follow_up"]
            assert judge.rate(prompt.conversation, synthetic.ideal_response(record["answer"])
                              ).score == 10
    sft = formats.read_sft(paths["sft_train"]).records
    multi = [c for c in sft if len(c.turns) > 2]
    assert all(len(c.turns) == 4 for c in multi) and 0.08 < len(multi) / len(sft) < 0.15
    # Two exchanges, the loss on both answers (each with its </s>).
    vocab = ByteVocabulary()
    tokenized = template.tokenize_conversation(multi[0], vocab)
    masked = np.asarray(tokenized.ids)[np.asarray(tokenized.loss_mask) > 0].tolist()
    answers = [multi[0].turns[1].content, multi[0].turns[3].content]
    assert masked == sum((vocab.encode(" " + a) + [vocab.eos_id] for a in answers), [])
    correct = np.mean([judge.rate(c.messages[:3], c.turns[3].content).correct for c in multi])
    assert 0.55 < correct < 0.85  # imperfect like the single-turn answers (wrong_rate 0.3)
    for name in ("pairs_train", "pairs_valid"):
        pairs = formats.read_pairs(paths[name]).records
        multi_pairs = [p for p in pairs if len(p.prompt.messages) == 3]
        assert 0.05 < len(multi_pairs) / len(pairs) < 0.15
        raw = [json.loads(line)["prompt"] for line in open(paths[name])]
        assert sum(isinstance(r, list) for r in raw) == len(multi_pairs)
        assert all(judge.rate(p.prompt, p.chosen).score == p.chosen_rating
                   > judge.rate(p.prompt, p.rejected).score for p in multi_pairs)
    assert any(len(c.turns) == 4 for c in formats.read_sft(paths["sft_valid"]).records)
    again = synthetic.write_suite(str(tmp_path / "again"), seed=3, num_prompts=700)
    assert all(open(paths[n]).read() == open(again[n]).read() for n in paths)


def test_pair_kinds_tell_correctness_length_and_unfinished_apart():
    parity = "Is 7 even or odd?"
    padded = f"{synthetic.FILLERS[0]} The answer is odd. {synthetic.FILLERS[3]}"
    assert synthetic.pair_kind(parity, "The answer is odd.", "The answer is even.") == \
        "correct_vs_wrong"
    assert synthetic.pair_kind(parity, "The answer is even.", "The answer is odd.") == \
        "correct_vs_wrong"  # the kind, not whether the pair is the right way round
    assert synthetic.pair_kind(parity, "The answer is odd.", padded) == "length"
    assert synthetic.pair_kind(parity, "The answer is even.", "The answer is even. Sure!") == \
        "length"  # both wrong, one longer
    assert synthetic.pair_kind(parity, "The answer is odd.", synthetic.FILLERS[0]) == \
        "unfinished"
    assert synthetic.pair_kind(parity, "Sure! The answer", "The answer is odd.") == "unfinished"
    follow_up = [{"role": "user", "content": "Write in uppercase: 'abcd'."},
                 {"role": "assistant", "content": "The answer is ABCD."},
                 {"role": "user", "content": "Reverse your answer."}]
    assert synthetic.pair_kind(follow_up, "The answer is DCBA.",
                               "The answer is ABCD.") == "correct_vs_wrong"


def test_without_mistakes_every_pair_of_the_suite_is_a_length_pair(tmp_path):
    paths = synthetic.write_suite(str(tmp_path), seed=0, num_prompts=300, wrong_rate=0.0)
    pairs = formats.read_pairs(paths["pairs_valid"]).records  # prompts: formats.Conversation
    assert any(len(p.prompt.messages) > 1 for p in pairs)
    assert pairs and {synthetic.pair_kind(p.prompt, p.chosen, p.rejected)
                      for p in pairs} == {"length"}


def test_correct_by_family_counts_only_what_the_suite_verifies():
    verdicts = synthetic.correct_by_family(
        ["Is 7 even or odd?", "Is 8 even or odd?", "What is 2 + 3?", "Tell me a joke.",
         [{"role": "user", "content": "Give the first letter of: 'abcd'."},
          {"role": "assistant", "content": "The answer is a."},
          {"role": "user", "content": "Now write your answer in uppercase."}]],
        ["The answer is odd.", "The answer is odd.", "Sure! The answer is 5.", "Ha.",
         "The answer is A."])
    assert verdicts == {"arithmetic": [True], "first_letter+uppercase": [True],
                        "parity": [True, False]}


def test_a_suite_of_some_families_and_padding_after_the_answer(tmp_path):
    from xwin_jax.errors import ConfigError

    paths = synthetic.write_suite(str(tmp_path), seed=0, num_prompts=200,
                                  families=["copy", "parity"])
    families = {synthetic.solve(p.text)[0] for split in synthetic.SPLITS
                for p in formats.read_prompts(paths[f"prompts_{split}"])}
    assert families == {"copy", "parity"}
    with pytest.raises(ConfigError, match="choose one or more of"):
        synthetic.make_prompts(0, 5, ["count"])
    # Padding follows the answer, so the answer sits where an unpadded one does.
    padded = synthetic.imperfect_response("wqnh", np.random.default_rng(0), 0.0, 1.0)
    assert padded.startswith("The answer is wqnh. ") and len(padded) > 40
