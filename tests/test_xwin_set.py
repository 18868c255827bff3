"""Xwin-Set pairs: chosen = the best eligible response, rejected by the documented rule,
prompts that give no pair counted by reason; the pairs data DPO trains on."""

import json

import pytest

from xwin_jax.data import formats, xwin_set
from xwin_jax.data.pairs_data import XwinSetPairsData
from xwin_jax.errors import ConfigError

PROMPT = formats.Conversation((formats.Message("user", "Sort 3, 1, 2."),))


def entry(scores, finished=None, responses=None, index=0):
    responses = responses or [f"answer {i}" for i in range(len(scores))]
    finished = finished or [True] * len(scores)
    return formats.XwinSetEntry(index, PROMPT, tuple(responses), tuple(scores),
                                tuple(finished), f"set.jsonl:{index + 1}")


# Scores by sample: ranked best first the eligible ones are 3 (2.0), 0 (1.0), 4 (0.5),
# 1 (-1.0); sample 2 is unfinished and sample 5 empty, so neither takes part.
SCORES = [1.0, -1.0, 5.0, 2.0, 0.5, 9.0]
FINISHED = [True, True, False, True, True, True]
RESPONSES = ["a", "b", "c", "d", "e", "  "]


@pytest.mark.parametrize("rule, rejected", [
    (xwin_set.PairRule("lowest"), "b"),
    (xwin_set.PairRule("rank", rank=1), "a"),
    (xwin_set.PairRule("rank", rank=2), "e"),
    (xwin_set.PairRule("rank", rank=-1), "b"),
    (xwin_set.PairRule("rank", rank=-2), "e"),
    (xwin_set.PairRule("percentile", percentile=0), "b"),
    (xwin_set.PairRule("percentile", percentile=50), "e"),   # round(0.5 * 3) = 2
    (xwin_set.PairRule("percentile", percentile=100), "a"),  # clipped to the runner-up
])
def test_each_rule_picks_the_documented_rejected_answer(rule, rejected):
    made = xwin_set.make_pairs([entry(SCORES, FINISHED, RESPONSES)], rule)
    [pair] = made.pairs
    assert (pair.chosen, pair.rejected) == ("d", rejected)
    assert made.scores[0][0] == 2.0 and pair.prompt == PROMPT


def test_sampled_below_draws_only_beyond_the_margin_and_is_seeded():
    rule = xwin_set.PairRule("sampled_below", min_margin=1.2, seed=3)
    picks = {xwin_set.make_pairs([entry(SCORES, FINISHED, RESPONSES, index=i)],
                                 rule).pairs[0].rejected for i in range(40)}
    assert picks == {"e", "b"}  # 0.5 and -1.0 are >= 1.2 below 2.0; "a" (1.0) is not
    again = [xwin_set.make_pairs([entry(SCORES, FINISHED, RESPONSES, index=i)],
                                 rule).pairs[0].rejected for i in range(10)]
    assert again == [xwin_set.make_pairs([entry(SCORES, FINISHED, RESPONSES, index=i)],
                                         rule).pairs[0].rejected for i in range(10)]


def test_prompts_without_a_usable_pair_are_skipped_and_counted():
    entries = [entry([1.0, 0.0], [True, False]),                  # one eligible
               entry([1.0, 0.9]),                                 # within the margin
               entry([1.0, 0.0], responses=["same", "same"]),     # identical texts
               entry([3.0, 1.0, 0.0])]                            # a pair
    made = xwin_set.make_pairs(entries, xwin_set.PairRule("lowest", min_margin=0.5))
    assert len(made.pairs) == 1 and made.pairs[0].rejected == "answer 2"
    assert made.skipped == {"too_few": 1, "no_such_rank": 0, "identical": 1, "margin": 1}
    ranks = xwin_set.make_pairs([entry([3.0, 1.0])], xwin_set.PairRule("rank", rank=2))
    assert ranks.skipped["no_such_rank"] == 1 and not ranks.pairs
    assert "(prompts skipped: 1 too_few, 1 identical, 1 margin)" in made.report()


def test_best_of_k_uses_the_first_k_samples_only():
    e = entry([0.0, 1.0, 5.0, -3.0])
    assert xwin_set.best_of(e, 2) == 1 and xwin_set.best_of(e) == 2
    [pair] = xwin_set.make_pairs([e], xwin_set.PairRule(best_of=3)).pairs
    assert (pair.chosen, pair.rejected) == ("answer 2", "answer 0")
    with pytest.raises(ConfigError, match="best_of=5 but the prompt has only 4 samples"):
        xwin_set.best_of(e, 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"rejected": "worst"}, "choose one of"), ({"rejected": "rank", "rank": 0}, "runner-up"),
    ({"percentile": 120}, r"\[0, 100\]"), ({"min_margin": -1}, ">= 0"),
    ({"best_of": 0}, "at least 1")])
def test_bad_rules_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        xwin_set.PairRule(**kwargs)


def test_xwin_set_files_are_validated_naming_the_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    good = {"index": 0, "prompt": "Hi.", "responses": ["a", "b"], "scores": [1, 0],
            "finished": [True, True]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "index": 1,
                                                           "scores": [1]}) + "\n")
    with pytest.raises(formats.DataFormatError,
                       match=r"samples.jsonl:2: field 'responses': .*differ in length"):
        formats.read_xwin_set(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(formats.DataFormatError, match=r"samples.jsonl:2.*prompt 0 again"):
        formats.read_xwin_set(str(path))


def test_pairs_data_from_an_xwin_set_tokenizes_multi_turn_prompts(tmp_path):
    path = tmp_path / "samples.jsonl"
    conversation = [{"role": "user", "content": "Sort 3, 1, 2."},
                    {"role": "assistant", "content": "The answer is 1, 2, 3."},
                    {"role": "user", "content": "Now reverse it."}]
    formats.write_jsonl(str(path), [
        {"index": i, "prompt": conversation if i % 2 else f"Prompt {i}.",
         "responses": ["The answer is 3, 2, 1.", "I do not know.", "x"],
         "scores": [2.0, -1.0, 0.0], "finished": [True, True, False]} for i in range(4)])
    data = XwinSetPairsData([str(path)], seq_len=128, batch_size=2, vocabulary="bytes")
    assert data.num_pairs == 4 and data.pair_skips["too_few"] == 0
    assert data.pairs[1].prompt.messages[1].content == "The answer is 1, 2, 3."
    assert (data.pairs[1].chosen, data.pairs[1].rejected) == ("The answer is 3, 2, 1.",
                                                                 "I do not know.")
    # Only the final answer is the response: its bytes and </s>.
    mask = data.arrays["chosen_response_mask"][1]
    assert int(mask.sum()) == len(" The answer is 3, 2, 1.") + 1
    assert "Xwin-Set pairs (rejected: lowest)" in data.report()
    changed = XwinSetPairsData([str(path)], seq_len=128, batch_size=2,
                               rule=xwin_set.PairRule("rank", rank=1))
    assert changed.fingerprint()["rule"] != data.fingerprint()["rule"]


def test_tiny_xwin_set_dpo_runs_from_the_gin_file(tmp_path):
    """gin/experiments/tiny_xwin_set_dpo.gin as a user runs it, on WORKDIR/sft/final and
    WORKDIR/xwin_set/samples.jsonl (a multi-turn prompt among them)."""
    import jax

    from xwin_jax import launch
    from xwin_jax.checkpoints.params import save_params
    from xwin_jax.data.vocabulary import ByteVocabulary
    from xwin_jax.models import llama

    cfg = llama.preset("tiny")
    save_params(str(tmp_path / "sft" / "final"), cfg, llama.init_params(cfg, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    (tmp_path / "xwin_set").mkdir()
    formats.write_jsonl(str(tmp_path / "xwin_set" / "samples.jsonl"), [
        {"index": i, "prompt": f"What is {i} + 1?" if i % 3 else [
            {"role": "user", "content": "Say a."}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": f"Now say {i}."}],
         "responses": [f"The answer is {i + 1}.", f"The answer is {i}.", "Hmm"],
         "scores": [1.5, -0.5, 0.2 if i else 1.5], "finished": [True, True, i != 1],
         "num_tokens": [16, 16, 4]} for i in range(6)])
    summary = launch.run_gin_job(["experiments/tiny_xwin_set_dpo.gin"], [
        f"WORKDIR = '{tmp_path}'", "TRAIN_STEPS = 2", "BATCH_SIZE = 2", "SEQ_LEN = 128",
        "dpo.train_dpo.async_checkpoints = False"])
    assert summary["steps"] == 2 and summary["train_data"]["pairs"] == 6
    assert summary["train_data"]["rejected_rule"] == "lowest"
    recorded = json.load(open(tmp_path / "dpo" / "fingerprint.json"))["fingerprint"]
    assert recorded["train_data"]["type"] == "XwinSetPairsData"
    assert recorded["train_data"]["rule"]["rejected"] == "lowest"


def test_repeated_texts_count_once_at_their_best_place():
    """With many samples of a short answer the runner-up is often the best again: the rule
    picks among distinct texts."""
    e = entry([3.0, 2.5, 1.0, 0.5], responses=["same", "same", "other", "same"])
    [pair] = xwin_set.make_pairs([e], xwin_set.PairRule("rank", rank=1)).pairs
    assert (pair.chosen, pair.rejected) == ("same", "other")
    made = xwin_set.make_pairs([entry([1.0, 0.0], responses=["x", "x"])])
    assert made.skipped["identical"] == 1 and not made.pairs


def test_too_few_pairs_say_why(tmp_path):
    path = tmp_path / "samples.jsonl"
    formats.write_jsonl(str(path), [{"index": i, "prompt": "Hi.", "responses": ["a", "b"],
                                     "scores": [1.0, 0.0], "finished": [True, False]}
                                    for i in range(3)])
    with pytest.raises(ConfigError, match=r"0 Xwin-Set pairs \(rule 'lowest'; prompts "
                                          r"skipped: 3 too_few\), fewer than batch_size=2"):
        XwinSetPairsData([str(path)], seq_len=64, batch_size=2)
