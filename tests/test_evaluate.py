"""AlpacaEval-style evaluation: the numbers against hand-computed cases, order randomisation,
the job with the rule judge, and the reward-model columns."""

import csv
import json
import math

import jax
import numpy as np
import pytest
import scipy.optimize

from conftest import GARBAGE
from xwin_jax import jobs
from xwin_jax.annotate.judge import RuleJudge
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic, template
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.errors import UserError
from xwin_jax.evaluate import pairwise, winrate
from xwin_jax.models import heads, llama
from xwin_jax.train.stage import SUMMARY_FILE, StageChanged


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
    # Two groups at x = +-c with win means .8 (model longer) and .4 (model shorter): without
    # the ridge, the saturated fit gives a = (logit .8 + logit .4) / 2 whatever c is.
    prefs = [2, 2, 2, 2, 1] + [2, 2, 1, 1, 1]
    model = [110] * 5 + [90] * 5
    reference = [100] * 10
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = 100 / (1 + math.exp(-(logit(0.8) + logit(0.4)) / 2))
    assert winrate.length_controlled_win_rate(prefs, model, reference, ridge=0.0) == (
        pytest.approx(expected, abs=1e-6))
    assert winrate.win_rate(prefs)[0] == pytest.approx(60.0)
    row = winrate.leaderboard_row(prefs, model, reference)
    assert (row["n_wins"], row["n_wins_base"], row["n_draws"], row["n_total"]) == (6, 4, 0, 10)
    assert row["avg_length"] == 100 and row["n_unjudged"] == 0
    assert set(row) == {*winrate.LEADERBOARD_COLUMNS, "n_unjudged", "length_controlled_variant"}
    assert row["length_controlled_variant"] == "length_only"  # no difficulty file


def _reference_lc(preferences, model_lengths, reference_lengths, ridge):
    """The same model fitted independently: scipy's BFGS on the penalised soft-label
    log-likelihood, with the length feature built from numpy by hand."""
    y = np.asarray(preferences, float) - 1
    d = np.asarray(model_lengths, float) - np.asarray(reference_lengths, float)
    x = np.tanh(d / np.sqrt(np.sum((d - d.mean()) ** 2) / (len(d) - 1)))

    def loss(w):
        eta = w[0] + w[1] * x
        return -np.sum(y * eta - np.log1p(np.exp(eta))) + ridge * w[1] ** 2 / 2

    w = scipy.optimize.minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    return 100 / (1 + np.exp(-w[0]))


# (preferences, model lengths, reference lengths) and the LC that scikit-learn 1.9's
# LogisticRegression(C=1, lbfgs, tol=1e-12) gives on tanh(delta / std) with soft labels as
# weighted duplicated rows (computed outside the project's environment).
LC_CASES = [
    (([2, 2, 2, 2, 1] + [2, 2, 1, 1, 1], [110] * 5 + [90] * 5, [100] * 10), 60.55734318080966),
    (([2, 1, 1.5, 2, 2, 1, 2, 1.5, 1, 2, 2, 2],
      [120, 80, 100, 300, 95, 60, 150, 100, 40, 210, 130, 99], [100] * 12), 64.31768087942449),
    (([2, 1], [110, 70], [100, 100]), 52.71038217895362),  # perfectly length-separated
]


@pytest.mark.parametrize("case,sklearn_lc", LC_CASES)
def test_length_controlled_fit_matches_independent_fits(case, sklearn_lc):
    lc = winrate.length_controlled_win_rate(*case)
    assert lc == pytest.approx(sklearn_lc, abs=1e-5)
    assert lc == pytest.approx(_reference_lc(*case, ridge=winrate.SLOPE_RIDGE), abs=1e-4)


def test_length_controlled_fit_on_a_larger_random_set():
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 80, 300)
    wins = rng.random(300) < 1 / (1 + np.exp(-(0.4 + 1.5 * np.tanh(delta / 80))))
    prefs = np.where(rng.random(300) < 0.1, 1.5, 1.0 + wins)
    model, reference = 500 + delta, np.full(300, 500.0)
    lc = winrate.length_controlled_win_rate(prefs, model, reference)
    assert lc == pytest.approx(_reference_lc(prefs, model, reference, 1.0), abs=1e-4)
    # At this n the ridge hardly matters: close to the unpenalised maximum likelihood.
    assert lc == pytest.approx(_reference_lc(prefs, model, reference, 0.0), abs=0.2)
    assert 100 / (1 + np.exp(-0.4)) - 8 < lc < 100 / (1 + np.exp(-0.4)) + 8


@pytest.mark.parametrize("prefs,model,reference,lc", [
    ([2, 2, 2, 2], [10, 200, 30, 40], [50] * 4, 100.0),  # all model wins: the fit's limit
    ([1, 1, 1], [10, 200, 30], [50] * 3, 0.0),           # all reference wins
    ([1.5, 1.5, 1.5], [10, 200, 30], [50] * 3, 50.0),    # all draws
    ([2], [10], [50], 100.0),                            # n = 1
    ([1], [10], [50], 0.0),
    ([1.5], [10], [50], 50.0),
    ([2, 1, 2], [50] * 3, [50] * 3, 100 * 2 / 3),        # identical lengths
    ([2, 1, 1.5, 1], [80] * 4, [50] * 4, 100 * 1.5 / 4),  # one length difference
])
def test_degenerate_inputs_give_the_documented_values(prefs, model, reference, lc):
    assert winrate.length_controlled_win_rate(prefs, model, reference) == pytest.approx(lc)
    row = winrate.leaderboard_row(prefs, model, reference)
    assert row["length_controlled_winrate"] == pytest.approx(lc)
    assert math.isnan(row["standard_error"]) == (len(prefs) == 1)


def test_perfectly_length_separated_pairs_stay_near_the_raw_win_rate():
    # The longer answer always won; the unpenalised fit has no maximum (it gave LC 97.5).
    for model in ([110, 70], [101, 70], [130, 90], [110, 90]):
        lc = winrate.length_controlled_win_rate([2, 1], model, [100, 100])
        assert 40 < lc < 60 and math.isfinite(lc)
    assert winrate.length_controlled_win_rate([2, 1], [110, 90], [100, 100]) == (
        pytest.approx(50.0))  # symmetric: exactly the raw win rate


def test_unjudged_preferences_are_left_out_and_counted():
    prefs = [2, None, 1, float("nan"), 1.5, 2]
    row = winrate.leaderboard_row(prefs, [10, 20, 30, 40, 50, 60], [35] * 6)
    judged = winrate.leaderboard_row([2, 1, 1.5, 2], [10, 30, 50, 60], [35] * 4)
    assert row["n_unjudged"] == 2 and row["n_total"] == 4
    for key in ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws",
                "length_controlled_winrate"):
        assert row[key] == pytest.approx(judged[key]), key
    assert row["avg_length"] == 35  # over every model output, as alpaca_eval
    with pytest.raises(ValueError, match="no judged preferences"):
        winrate.leaderboard_row([None, None], [1, 2], [3, 4])


def write_df_gamed(path, n, *, skip=()):
    """A df_gamed.csv as AlpacaEval ships it (its columns; preference on its [0, 1] scale)
    for instructions 0..n-1 except `skip`, two gamed baselines; the difficulty of index i is
    (i % 5 - 2) / 2, and the baselines win more often the higher it is."""
    rows = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    for model, sign in (("gpt4_1106_preview_verbose", 1), ("gpt4_1106_preview_concise", -1)):
        rows += [f"{model},{i},{(i % 5) / 4},{sign * (1 + i % 4) / 2},{(i % 5 - 2) / 2},False"
                 for i in range(n) if i not in skip]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_difficulty_files_are_read_as_alpaca_eval_ships_them(tmp_path):
    gamed = winrate.read_instruction_difficulty(write_df_gamed(tmp_path / "df_gamed.csv", 4))
    assert gamed.variant == "alpaca_eval_2.0"
    assert gamed.difficulty == {0: -1.0, 1: -0.5, 2: 0.0, 3: 0.5}
    np.testing.assert_allclose(gamed.for_instructions([0, 1, 3]), [-1.0, -0.5, 0.5])
    # Rows: tanh(std_delta_len), difficulty, not_gamed_baseline; weight lambda / 2 = 0.1.
    np.testing.assert_allclose(gamed.gamed_features[:2], [[np.tanh(0.5), -1, 0],
                                                          [np.tanh(1.0), -0.5, 0]])
    np.testing.assert_allclose(gamed.gamed_preferences[:3], [0, 0.25, 0.5])
    assert gamed.gamed_features.shape == (8, 3) and set(gamed.gamed_weights) == {0.1}
    alone = tmp_path / "instruction_difficulty.csv"
    alone.write_text("index,instruction_difficulty\n0,0.25\n1,-1.5\n")
    difficulty = winrate.read_instruction_difficulty(str(alone))
    assert difficulty.variant == "alpaca_eval_2.0_noreg" and difficulty.gamed_features is None
    assert difficulty.difficulty == {0: 0.25, 1: -1.5}
    with pytest.raises(formats.DataFormatError,
                       match=r"instruction_difficulty.csv: no instruction_difficulty for 2 of "
                             r"the 4 instructions evaluated \(index 2, 3; the file has 2\)"):
        difficulty.for_instructions(range(4))
    alone.write_text("index,instruction_difficulty\n0,0.25\n1,hard\n")
    with pytest.raises(formats.DataFormatError,
                       match=r"instruction_difficulty.csv:3: field 'instruction_difficulty': "
                             r"expected a number, got 'hard'"):
        winrate.read_instruction_difficulty(str(alone))
    alone.write_text("index,instruction_difficulty\n0,0.25\n1\n")
    with pytest.raises(formats.DataFormatError,
                       match=r"instruction_difficulty.csv:3: field 'instruction_difficulty': "
                             r"missing"):
        winrate.read_instruction_difficulty(str(alone))
    alone.write_text("index,difficulty\n0,0.25\n")
    with pytest.raises(formats.DataFormatError, match=r"expected AlpacaEval's df_gamed.csv"):
        winrate.read_instruction_difficulty(str(alone))
    with pytest.raises(formats.DataFormatError, match="cannot read"):
        winrate.read_instruction_difficulty(str(tmp_path / "missing.csv"))


def test_official_length_controlled_fit_edge_cases(tmp_path):
    """AlpacaEval 2.0's GLM stays defined (tests/test_lc_alpaca_eval.py compares it with
    alpaca_eval itself, unjudged rows included)."""
    difficulty = winrate.read_instruction_difficulty(write_df_gamed(tmp_path / "g.csv", 8))
    lengths = [10, 200, 30, 40, 60, 70]
    for prefs, reference in (([2] * 6, [50] * 6), ([1] * 6, [50] * 6), ([1.5] * 6, [50] * 6),
                             ([2, 1, 2, 1.5, 1, 1], lengths), ([2], [10])):
        lc = winrate.alpaca_eval_length_controlled_win_rate(prefs, lengths[:len(prefs)],
                                                            reference, difficulty)
        assert 0 <= lc <= 100 and math.isfinite(lc)
    # Identical lengths, n = 1: the length feature is 0, so lengths do not matter.
    np.testing.assert_allclose(winrate.standardised_length_feature(np.array([3.0])), [0])
    np.testing.assert_allclose(winrate.standardised_length_feature(np.zeros(3)), [0, 0, 0])
    np.testing.assert_allclose(winrate.standardised_length_feature(np.full(3, -4.0)), [-1] * 3)
    d = np.array([10.0, -20.0, 40.0])
    np.testing.assert_allclose(winrate.standardised_length_feature(d),
                               np.tanh(d / np.std(d, ddof=1)))
    row = winrate.leaderboard_row([2, None, 1, 2, 1.5, 2], lengths, [50] * 6, difficulty)
    assert row["length_controlled_winrate"] == winrate.alpaca_eval_length_controlled_win_rate(
        [2, None, 1, 2, 1.5, 2], lengths, [50] * 6, difficulty)
    assert (row["length_controlled_variant"], row["n_total"], row["n_unjudged"]) == (
        "alpaca_eval_2.0", 5, 1)


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


def evaluate(outputs, out, judge, overwrite=False, **kwargs):
    """The job as launch runs it (jobs.run)."""
    return jobs.run(lambda: pairwise.evaluate_job(outputs["model"], outputs["reference"],
                                                  str(out), judge, **kwargs),
                    str(out), overwrite=overwrite)


def test_evaluate_job_with_the_rule_judge(outputs, tmp_path, capsys):
    judge = CountingJudge()
    row = evaluate(outputs, tmp_path / "eval", judge)
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
    # AlpacaEval's columns first and unchanged, then ours.
    assert table[0][""] == "aligned"
    assert list(table[0])[1:] == [*winrate.LEADERBOARD_COLUMNS, *pairwise.EXTRA_COLUMNS]
    assert table[0]["n_unjudged"] == "0" and table[0]["rm_win_rate"] == ""
    assert table[0]["length_controlled_variant"] == "length_only"
    summary = json.load(open(tmp_path / "eval" / SUMMARY_FILE))
    assert summary["win_rate"] == row["win_rate"] and summary["n_unjudged"] == 0
    assert summary["judge"] == judge.model and summary["generator"] == "aligned"
    # The same command: skipped, the judge not asked.
    again = CountingJudge()
    assert evaluate(outputs, tmp_path / "eval", again) == row and again.seen == []
    assert "[evaluate] already finished" in capsys.readouterr().out
    # Other model outputs, or another order seed: refused, naming what changed.
    with open(outputs["model"]) as f:
        records = json.load(f)
    records[3]["output"] = "Something else."
    with open(outputs["model"], "w") as f:
        json.dump(records, f)
    with pytest.raises(StageChanged, match=r"model_outputs\.sha256: "):
        evaluate(outputs, tmp_path / "eval", CountingJudge())
    with pytest.raises(StageChanged, match=r"seed: 0 → 1"):
        evaluate(outputs, tmp_path / "eval", CountingJudge(), seed=1)
    # With overwrite the stage is judged again, but the cached verdicts stay (keyed by the
    # two outputs and the judge): only the changed answer is paid for.
    redone_judge = CountingJudge()
    redone = evaluate(outputs, tmp_path / "eval", redone_judge, overwrite=True)
    assert len(redone_judge.seen) == 1 and "Something else." in str(redone_judge.seen[0])
    # The changed answer states no answer, as the reference: a draw now.
    assert (redone["n_wins"], redone["n_wins_base"], redone["n_draws"]) == (10, 0, 2)


def test_evaluate_gin_run(outputs, tmp_path):
    from xwin_jax import launch

    out = tmp_path / "eval"
    bindings = [f"MODEL_OUTPUTS = '{outputs['model']}'",
                f"REFERENCE_OUTPUTS = '{outputs['reference']}'", f"OUTPUT_DIR = '{out}'"]
    row = launch.run_gin_job(["runs/evaluate.gin"], bindings)
    assert (row["n_wins"], row["n_draws"], row["judge"]) == (11, 1, "rule-judge-v1")
    assert (out / "config.gin").exists() and (out / "operative_config.gin").exists()
    with pytest.raises(StageChanged, match=r"name: \"aligned\" → \"renamed\""):
        launch.run_gin_job(["runs/evaluate.gin"],
                           bindings + ["pairwise.evaluate_job.name = 'renamed'"])


def test_evaluate_job_with_alpaca_evals_difficulty_file(outputs, tmp_path, capsys):
    gamed = write_df_gamed(tmp_path / "df_gamed.csv", 12)
    row = evaluate(outputs, tmp_path / "eval", RuleJudge(), instruction_difficulty=gamed)
    annotations = json.load(open(tmp_path / "eval" / pairwise.ANNOTATIONS_FILE))
    prefs = [a["preference"] for a in annotations]
    model = [len(a["output_2"]) for a in annotations]
    reference = [len(a["output_1"]) for a in annotations]
    expected = winrate.alpaca_eval_length_controlled_win_rate(
        prefs, model, reference, winrate.read_instruction_difficulty(gamed))
    assert row["length_controlled_winrate"] == pytest.approx(expected)
    assert row["length_controlled_winrate"] != pytest.approx(
        winrate.length_controlled_win_rate(prefs, model, reference), abs=0.1)
    assert row["length_controlled_variant"] == "alpaca_eval_2.0"
    assert f"LC {expected:.1f}, alpaca_eval_2.0)" in capsys.readouterr().out
    summary = json.load(open(tmp_path / "eval" / SUMMARY_FILE))
    assert summary["length_controlled_variant"] == "alpaca_eval_2.0"
    assert summary["instruction_difficulty_file"] == gamed
    with open(tmp_path / "eval" / pairwise.LEADERBOARD_FILE) as f:
        [table] = list(csv.DictReader(f))
    assert list(table)[1:9] == list(winrate.LEADERBOARD_COLUMNS)
    assert list(table)[-1] == "length_controlled_variant"
    assert table["length_controlled_variant"] == "alpaca_eval_2.0"
    assert float(table["length_controlled_winrate"]) == pytest.approx(expected)
    # Another difficulty file is another evaluation: refused, naming it.
    other = write_df_gamed(tmp_path / "other.csv", 13)
    with pytest.raises(StageChanged, match=r"instruction_difficulty\.sha256: "):
        evaluate(outputs, tmp_path / "eval", RuleJudge(), instruction_difficulty=other)
    # A file without some of the instructions: an error before the judge is asked.
    judge = CountingJudge()
    with pytest.raises(formats.DataFormatError,
                       match=r"short.csv: no instruction_difficulty for 2 of the 12 "
                             r"instructions evaluated \(index 3, 11; the file has 10\)"):
        evaluate(outputs, tmp_path / "eval2", judge,
                 instruction_difficulty=write_df_gamed(tmp_path / "short.csv", 12, skip=(3, 11)))
    assert judge.seen == []
    # An instruction's index is its position in the reference outputs (alpaca_eval's order).
    with open(outputs["reference"]) as f:
        records = json.load(f)
    with open(outputs["reference"], "w") as f:
        json.dump(records[::-1], f)
    row = evaluate(outputs, tmp_path / "eval3", RuleJudge(), instruction_difficulty=gamed)
    assert row["length_controlled_winrate"] == pytest.approx(
        winrate.alpaca_eval_length_controlled_win_rate(
            prefs, model, reference, winrate.read_instruction_difficulty(gamed),
            indices=list(range(11, -1, -1))))
    assert row["length_controlled_winrate"] != pytest.approx(expected, abs=1e-3)


def test_evaluate_gin_run_with_the_difficulty_file(outputs, tmp_path):
    from xwin_jax import launch

    gamed = write_df_gamed(tmp_path / "df_gamed.csv", 12)
    out = tmp_path / "eval"
    row = launch.run_gin_job(["runs/evaluate.gin"], [
        f"MODEL_OUTPUTS = '{outputs['model']}'", f"REFERENCE_OUTPUTS = '{outputs['reference']}'",
        f"OUTPUT_DIR = '{out}'", f"INSTRUCTION_DIFFICULTY = '{gamed}'"])
    assert row["length_controlled_variant"] == "alpaca_eval_2.0"


def test_reward_model_columns(outputs, tmp_path, capsys):
    cfg = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
    # No vocabulary is given: the reward model's own (recorded with it) tokenizes.
    rng = np.random.default_rng(0)  # random weights without compiling an init
    params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype),
                          heads.reward_param_shapes(cfg))
    save_params(str(tmp_path / "rm"), cfg, params, head="score", vocabulary=ByteVocabulary())
    with open(tmp_path / "rm" / "reward_stats.json", "w") as f:
        json.dump({"mean": 0.5, "std": 2.0}, f)
    out = tmp_path / "eval"
    # The default partitioner: batches of 8 over the 8 CPU devices.
    row = evaluate(outputs, out, RuleJudge(), reward_dir=str(tmp_path / "rm"),
                   reward_seq_len=384, reward_batch_size=8)
    matched = pairwise.match_outputs(pairwise.read_outputs(outputs["model"]),
                                     pairwise.read_outputs(outputs["reference"]))
    # Each output scored alone, unpadded, through the chat template.
    vocab = ByteVocabulary()

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
    wins = [float(a > b) + 0.5 * (a == b)
            for a, b in zip(model, reference)]
    wins[0] = 0.5  # the identical pair
    expected = {"rm_mean_reward": np.mean(model), "rm_mean_reward_reference": np.mean(reference),
                "rm_win_rate": 100 * np.mean(wins)}
    # In the returned row, summary.json, leaderboard.csv (after AlpacaEval's columns) and
    # the printed lines.
    summary = json.load(open(out / SUMMARY_FILE))
    with open(out / pairwise.LEADERBOARD_FILE) as f:
        [table] = list(csv.DictReader(f))
    assert list(table)[1:9] == list(winrate.LEADERBOARD_COLUMNS)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-4), key
        assert summary[key] == row[key] and float(table[key]) == pytest.approx(row[key])
    printed = capsys.readouterr().out
    assert (f"[evaluate] reward model: mean reward {row['rm_mean_reward']:.3f} (reference "
            f"{row['rm_mean_reward_reference']:.3f}), RM win rate {row['rm_win_rate']:.1f}"
            in printed)
    # The reward model is a setting: other stats (or weights) are refused, naming them.
    with open(tmp_path / "rm" / "reward_stats.json", "w") as f:
        json.dump({"mean": 0.0, "std": 2.0}, f)
    with pytest.raises(StageChanged, match=r"reward_model\.stats\.mean: 0\.5 → 0\.0"):
        evaluate(outputs, out, RuleJudge(), reward_dir=str(tmp_path / "rm"),
                 reward_seq_len=384, reward_batch_size=8)


def test_bad_outputs_files_name_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": "x"}]')
    with pytest.raises(formats.DataFormatError, match=r"bad.json:2: field 'output': missing"):
        pairwise.read_outputs(str(path))
    path.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": }]')
    with pytest.raises(formats.DataFormatError, match=r"bad.json:2: invalid JSON"):
        pairwise.read_outputs(str(path))
    path.write_text(json.dumps([["x", "y"]]))
    with pytest.raises(UserError, match=r"bad.json:1: field '<record>': expected a JSON object"):
        pairwise.read_outputs(str(path))
    path.write_bytes(b'{"instruction": "x", "output": "y"}\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"bad.json:2: field '<line>': not valid UTF-8"):
        pairwise.read_outputs(str(path))
    with pytest.raises(formats.DataFormatError, match="no reference output"):
        pairwise.match_outputs([{"instruction": "a", "output": "b"}], [])
    with pytest.raises(UserError, match="cannot read"):
        pairwise.read_outputs(str(tmp_path / "missing.json"))


def test_jsonl_outputs_split_on_newlines_only(tmp_path):
    records = [{"instruction": "one\u2028two", "output": "a\x85b\u2029c"},
               {"instruction": "three", "output": "d\re"}]
    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps(records[0], ensure_ascii=False) + "\n\n"
                    + json.dumps(records[1], ensure_ascii=False) + "\n", encoding="utf-8")
    assert pairwise.read_outputs(str(path)) == records
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"instruction": "four"}\n')
    with pytest.raises(formats.DataFormatError, match=r"outputs.jsonl:4: field 'output': missing"):
        pairwise.read_outputs(str(path))
    path.write_text(json.dumps(records[1]) + "\n{not json\n")
    with pytest.raises(formats.DataFormatError,
                       match=r"outputs.jsonl:2: field '<line>': invalid JSON"):
        pairwise.read_outputs(str(path))


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


def test_an_unjudged_instruction_is_reported_and_a_rerun_asks_only_for_it(
        fake_judge, outputs, tmp_path, capsys):
    """A judge that appends an AlpacaEval-style list to its verdict, and answers one
    instruction with prose twice."""
    model = pairwise.read_outputs(outputs["model"])
    reference = pairwise.read_outputs(outputs["reference"])
    bad = model[5]["instruction"]
    fake, judge = fake_judge(style="trailing_list", by_prompt={bad: ["garbage", "garbage"]})
    out = tmp_path / "eval"
    row = pairwise.evaluate_job(outputs["model"], outputs["reference"], str(out), judge)
    assert fake.calls == 10 + 2 and fake.prompt_calls[bad] == 2
    assert set(v for k, v in fake.prompt_calls.items() if k != bad) == {1}
    judged = [(m, r) for i, (m, r) in enumerate(zip(model, reference)) if i not in (0, 5)]
    shorter = sum(len(m["output"]) < len(r["output"]) for m, r in judged)
    assert (row["n_wins"], row["n_wins_base"], row["n_draws"]) == (shorter, 10 - shorter, 1)
    assert (row["n_total"], row["n_unjudged"]) == (11, 1)
    assert row["win_rate"] == pytest.approx(100 * (shorter + 0.5) / 11)
    # annotations.json: alpaca_eval's mark for an annotation it could not parse (a null
    # preference, which its get_winrate drops from the win rate and from n_total).
    annotations = json.load(open(out / pairwise.ANNOTATIONS_FILE))
    assert annotations[5]["preference"] is None and annotations[5]["reason"].startswith(
        "unjudged: ")
    kept = [a["preference"] - 1 for a in annotations if a["preference"] is not None]
    assert len(kept) == row["n_total"] and 100 * np.mean(kept) == pytest.approx(row["win_rate"])
    [record] = [json.loads(line) for line in open(out / "unjudged.jsonl")]
    assert (record["index"], record["instruction"][:40], record["reply"]) == (5, bad[:40],
                                                                              GARBAGE)
    summary = json.load(open(out / SUMMARY_FILE))
    assert summary["n_unjudged"] == 1 and summary["n_total"] == 11
    with open(out / pairwise.LEADERBOARD_FILE) as f:
        assert [r["n_unjudged"] for r in csv.DictReader(f)] == ["1"]
    printed = capsys.readouterr().out.strip().splitlines()  # then the stage's "done" line
    assert printed[-2].startswith(
        f"[evaluate] 1 instruction unjudged (see {out / 'unjudged.jsonl'})")
    assert "over 11 instructions" in printed[-3]
    # A healthy rerun pays for that instruction only.
    fake, judge = fake_judge()
    row = pairwise.evaluate_job(outputs["model"], outputs["reference"], str(out), judge)
    assert fake.prompt_calls == {bad: 1}
    assert (row["n_total"], row["n_unjudged"]) == (12, 0)
    assert (out / "unjudged.jsonl").read_text() == ""
    assert "instruction unjudged" not in capsys.readouterr().out


def test_nothing_judged_is_a_user_error(fake_judge, outputs, tmp_path):
    fake, judge = fake_judge(style="garbage")
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="no instruction could be judged"):
        pairwise.evaluate_job(outputs["model"], outputs["reference"], str(out), judge)
    assert fake.calls == 11 * 2
    assert len((out / "unjudged.jsonl").read_text().strip().split("\n")) == 11
    assert not (out / pairwise.LEADERBOARD_FILE).exists()
    assert not (out / SUMMARY_FILE).exists()  # unfinished: the same command tries again
