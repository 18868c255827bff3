"""AlpacaEval-style evaluation: the numbers against hand-computed cases, order randomisation,
the job with the rule judge, and the reward-model columns."""

import csv
import json
import math

import jax
import numpy as np
import pytest

from xwin_jax.annotate.judge import RuleJudge
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic, template
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.evaluate import pairwise, winrate
from xwin_jax.models import heads, llama


def test_win_rate_and_standard_error_by_hand():
    rate, error = winrate.win_rate([2, 1, 1.5, 2])
    assert rate == pytest.approx(62.5)
    # y = [1, 0, .5, 1]: squared deviations sum to .6875; sqrt(.6875 / 3) / sqrt(4)
    assert error == pytest.approx(100 * math.sqrt(0.6875 / 3) / 2)
    with pytest.raises(ValueError, match="1, 2"):
        winrate.win_rate([0.5, 2])


def test_length_controlled_win_rate_by_hand():
    # Equal lengths: the regression has only its intercept, so LC = the plain win rate.
    prefs = [2, 2, 1, 1.5, 2]
    assert winrate.length_controlled_win_rate(prefs, [5] * 5, [5] * 5) == pytest.approx(
        winrate.win_rate(prefs)[0], abs=1e-6)
    # Two groups at x = +-tanh(1) with win means .8 (model longer) and .4 (model shorter): the
    # saturated fit gives a = (logit .8 + logit .4) / 2.
    prefs = [2, 2, 2, 2, 1] + [2, 2, 1, 1, 1]
    model = [110] * 5 + [90] * 5
    reference = [100] * 10
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = 100 / (1 + math.exp(-(logit(0.8) + logit(0.4)) / 2))
    assert winrate.length_controlled_win_rate(prefs, model, reference) == pytest.approx(
        expected, abs=1e-4)
    assert winrate.win_rate(prefs)[0] == pytest.approx(60.0)
    row = winrate.leaderboard_row(prefs, model, reference)
    assert (row["n_wins"], row["n_wins_base"], row["n_draws"], row["n_total"]) == (6, 4, 0, 10)
    assert row["avg_length"] == 100 and set(row) == set(winrate.LEADERBOARD_COLUMNS)


def test_order_randomisation_is_deterministic_and_balanced():
    instructions = [f"instruction {i}" for i in range(2000)]
    first = [pairwise.swapped_order(s, seed=0) for s in instructions]
    assert first == [pairwise.swapped_order(s, seed=0) for s in instructions]
    assert 0.46 < np.mean(first) < 0.54
    assert first != [pairwise.swapped_order(s, seed=1) for s in instructions]


class CountingJudge(RuleJudge):
    """The rule judge, remembering the order it was shown."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def compare(self, prompt, response_a, response_b):
        self.seen.append((prompt, response_a, response_b))
        return super().compare(prompt, response_a, response_b)


@pytest.fixture
def outputs(tmp_path):
    prompts = synthetic.make_prompts(0, 12)
    answers = [synthetic.solve(p)[1] for p in prompts]
    model = [{"instruction": p, "output": synthetic.ideal_response(a), "generator": "aligned",
              "dataset": "synthetic"} for p, a in zip(prompts, answers)]
    reference = [{"instruction": p, "output": "I am not sure.", "generator": "sft",
                  "dataset": "synthetic"} for p in prompts]
    reference[0]["output"] = model[0]["output"]  # identical: a draw, never judged
    reference[1]["output"] = synthetic.ideal_response(answers[1]) + " " + synthetic.FILLERS[0]
    paths = {}
    for name, records in (("model", model), ("reference", reference)):
        paths[name] = str(tmp_path / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(records, f)
    return paths


def test_evaluate_job_with_the_rule_judge(outputs, tmp_path):
    judge = CountingJudge()
    row = pairwise.evaluate_job(outputs["model"], outputs["reference"], str(tmp_path / "eval"),
                                judge)
    # 11 judged: the model's correct, concise answers beat every reference; one draw.
    assert (row["n_wins"], row["n_wins_base"], row["n_draws"]) == (11, 0, 1)
    assert row["win_rate"] == pytest.approx(100 * 11.5 / 12)
    assert len(judge.seen) == 11
    # The order the judge saw follows the per-instruction draw.
    for prompt, a, _ in judge.seen:
        model_first = pairwise.swapped_order(prompt)
        assert (a == synthetic.ideal_response(synthetic.solve(prompt)[1])) == model_first
    annotations = json.load(open(tmp_path / "eval" / pairwise.ANNOTATIONS_FILE))
    assert annotations[0]["preference"] == 1.5 and annotations[0]["reason"] == "identical outputs"
    assert annotations[2]["rating_model"] == 10 and annotations[2]["rating_reference"] == 1
    with open(tmp_path / "eval" / pairwise.LEADERBOARD_FILE) as f:
        table = list(csv.DictReader(f))
    assert table[0][""] == "aligned" and list(table[0])[1:] == list(winrate.LEADERBOARD_COLUMNS)
    # A rerun is answered from the cache.
    again = CountingJudge()
    assert pairwise.evaluate_job(outputs["model"], outputs["reference"],
                                 str(tmp_path / "eval"), again)["win_rate"] == row["win_rate"]
    assert again.seen == []


def test_reward_model_columns(outputs, tmp_path):
    cfg = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
    save_params(str(tmp_path / "rm"), cfg, heads.init_reward_params(cfg, jax.random.key(0)),
                head="score")
    with open(tmp_path / "rm" / "reward_stats.json", "w") as f:
        json.dump({"mean": 0.5, "std": 2.0}, f)
    matched = pairwise.match_outputs(pairwise.read_outputs(outputs["model"]),
                                     pairwise.read_outputs(outputs["reference"]))
    scores = pairwise.reward_model_scores(str(tmp_path / "rm"), matched, seq_len=384,
                                          batch_size=8)
    # Each output scored alone, unpadded, through the chat template.
    params = heads.init_reward_params(cfg, jax.random.key(0))
    vocab = get_vocabulary("bytes")

    score = jax.jit(lambda tokens, mask: heads.RewardModel(cfg).apply({"params": params},
                                                                      tokens, mask))

    def alone(instruction, output):  # one row, right-padded to a fixed width
        ids = template.tokenize_conversation(formats.Conversation((
            formats.Message(formats.USER, instruction),
            formats.Message(formats.ASSISTANT, output))), vocab).ids
        tokens, mask = np.zeros((1, 384), np.int32), np.zeros((1, 384), np.int32)
        tokens[0, :len(ids)], mask[0, :len(ids)] = ids, 1
        return (float(score(tokens, mask)[0]) - 0.5) / 2.0

    model = [alone(m["instruction"], m["output"]) for m, _ in matched]
    reference = [alone(r["instruction"], r["output"]) for _, r in matched]
    assert scores["rm_mean_reward"] == pytest.approx(np.mean(model), abs=1e-4)
    assert scores["rm_mean_reward_reference"] == pytest.approx(np.mean(reference), abs=1e-4)
    wins = [float(a > b) + 0.5 * (a == b)
            for a, b in zip(model, reference)]
    wins[0] = 0.5  # the identical pair
    assert scores["rm_win_rate"] == pytest.approx(100 * np.mean(wins))


def test_bad_outputs_files_name_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="record 0 lacks"):
        pairwise.read_outputs(str(path))
    with pytest.raises(ValueError, match="no reference output"):
        pairwise.match_outputs([{"instruction": "a", "output": "b"}], [])


def test_evaluate_job_with_an_openai_compatible_judge(fake_judge, outputs, tmp_path):
    """The fake GPT-4 prefers the shorter answer; it sees each pair in the drawn order."""
    fake, judge = fake_judge(["429"])
    model = pairwise.read_outputs(outputs["model"])
    reference = pairwise.read_outputs(outputs["reference"])
    row = pairwise.evaluate_job(outputs["model"], outputs["reference"], str(tmp_path / "eval"),
                                judge)
    shorter = sum(len(m["output"]) < len(r["output"]) for m, r in zip(model, reference))
    longer = sum(len(m["output"]) > len(r["output"]) for m, r in zip(model, reference))
    assert (row["n_wins"], row["n_wins_base"], row["n_draws"]) == (shorter, longer, 1)
    assert row["judge"] == "fake-gpt-4" and fake.calls == 11 + 1  # 11 pairs, one 429 retried
    # A judge that only compares gives SFT's score from its side of the comparisons.
    from xwin_jax.report import table
    results = {"eval/sft": {"judge_score": None, "task_accuracy": None, "win_rate_vs_sft": 50.0,
                            "standard_error": 0.0, "length_controlled_winrate": 50.0,
                            "rm_mean_reward": None},
               "eval/ppo": {"judge_score": row["mean_rating_model"], "task_accuracy": None,
                            "win_rate_vs_sft": row["win_rate"],
                            "standard_error": row["standard_error"],
                            "length_controlled_winrate": row["length_controlled_winrate"],
                            "rm_mean_reward": None,
                            "sft_judge_score_in_comparison": row["mean_rating_reference"]}}
    assert f"| sft | {row['mean_rating_reference']:.2f} |" in table(results)
