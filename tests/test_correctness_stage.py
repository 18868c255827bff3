"""The quickstart's correctness stage: the reward model on every held-out pair by kind, the
policies' held-out task accuracy by family, and the report's tables of both."""

import json
import shutil

import numpy as np
import pytest
from conftest import write_policy_and_reward

from xwin_jax import pipeline, report
from xwin_jax.data import formats
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.models import llama
from xwin_jax.rewards import RewardScorer
from xwin_jax.train.stage import StageChanged

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
PARITY = "Is 7 even or odd?"
PAIRS = [  # (prompt, chosen, rejected): 2 correct-vs-wrong, 1 length, 1 unfinished
    (PARITY, "The answer is odd.", "The answer is even."),
    ("What is 2 + 3?", "The answer is 5.", "The answer is 6."),
    (PARITY, "The answer is odd.", "Sure! I would be glad to help. The answer is odd."),
    (PARITY, "The answer is odd.", "Let me think about this carefully."),
]
OUTPUTS = {"sft": ["The answer is odd.", "The answer is 4."],
           "dpo": ["The answer is odd.", "The answer is 5."]}


def _workdir(tmp_path):
    workdir = tmp_path / "w"
    write_policy_and_reward(tmp_path, CFG, ByteVocabulary())
    shutil.copytree(tmp_path / "rm", workdir / "reward" / "final")
    for directory in ("data/suite", "eval/sft/outputs", "eval/dpo/outputs"):
        (workdir / directory).mkdir(parents=True)
    formats.write_jsonl(str(workdir / "data" / "suite" / "pairs_valid.jsonl"),
                        [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    for name, answers in OUTPUTS.items():
        formats.write_jsonl(str(workdir / "eval" / name / "outputs" / "outputs.jsonl"), [
            {"index": i, "instruction": q, "output": a}
            for i, (q, a) in enumerate(zip((PARITY, "What is 2 + 3?"), answers))])
    return workdir


def test_the_reward_model_by_pair_kind_and_the_policies_by_family(tmp_path, capsys):
    workdir = _workdir(tmp_path)
    summary = pipeline.correctness_stage(str(workdir), CFG, policies=("sft", "dpo"),
                                         seq_len=128)
    # Each pair scored alone, one row per call: the stage's batched scores must agree.
    scorer = RewardScorer.load(str(workdir / "reward" / "final"), CFG)
    right = np.array([scorer.score_texts([p], [c], ByteVocabulary(), seq_len=128, batch_size=1)[0]
                      > scorer.score_texts([p], [r], ByteVocabulary(), seq_len=128,
                                           batch_size=1)[0] for p, c, r in PAIRS])
    reward = summary["reward_pairs"]
    assert reward["pairs"] == 4
    assert reward["accuracy"] == pytest.approx(right.mean())
    assert reward["by_kind"] == {
        "correct_vs_wrong": {"accuracy": pytest.approx(right[:2].mean()), "pairs": 2},
        "length": {"accuracy": float(right[2]), "pairs": 1},
        "unfinished": {"accuracy": float(right[3]), "pairs": 1}}
    assert summary["task_accuracy_by_family"] == {
        "sft": {"arithmetic": 0.0, "parity": 1.0}, "dpo": {"arithmetic": 1.0, "parity": 1.0}}
    assert "reward model on 4 held-out pairs" in capsys.readouterr().out

    # The same command skips; another policy's answers are another input.
    assert pipeline.correctness_stage(str(workdir), CFG, policies=("sft", "dpo"),
                                      seq_len=128) == summary
    outputs = workdir / "eval" / "dpo" / "outputs" / "outputs.jsonl"
    outputs.write_text(outputs.read_text().replace("is 5.", "is 7."))
    with pytest.raises(StageChanged):
        pipeline.correctness_stage(str(workdir), CFG, policies=("sft", "dpo"), seq_len=128)


def test_the_stage_scores_with_the_system_line_the_reward_model_was_trained_with(
        tmp_path, monkeypatch):
    workdir = _workdir(tmp_path)
    scorer = RewardScorer.load(str(workdir / "reward" / "final"), CFG)
    prompts, chosen = [p for p, _, _ in PAIRS], [c for _, c, _ in PAIRS]
    without, xwin = (scorer.score_texts(prompts, chosen, ByteVocabulary(), seq_len=128,
                                        system=system) for system in ("", None))
    assert not np.allclose(without, xwin)  # the system line changes what the RM reads
    systems = []
    score_texts = RewardScorer.score_texts

    def recording(self, *args, system=None, **kwargs):
        systems.append(system)
        return score_texts(self, *args, system=system, **kwargs)

    monkeypatch.setattr(RewardScorer, "score_texts", recording)
    pipeline.correctness_stage(str(workdir), CFG, policies=("sft",), seq_len=128, system="")
    assert systems == ["", ""]  # chosen, then rejected


def test_the_report_shows_both_tables_and_no_row_for_the_stage(tmp_path):
    results = {
        "reward": {"final_eval": {"accuracy": 0.5}, "wall_time_s": 3.0},
        "eval/sft": {"judge_score": 3.0, "task_accuracy": 0.5},
        report.CORRECTNESS_STAGE: {
            "reward_pairs": {"accuracy": 0.75, "pairs": 4, "by_kind": {
                "correct_vs_wrong": {"accuracy": 0.5, "pairs": 2},
                "length": {"accuracy": 1.0, "pairs": 1},
                "unfinished": {"accuracy": 1.0, "pairs": 1}}},
            "task_accuracy_by_family": {"sft": {"arithmetic": 0.0, "parity": 1.0}}}}
    written = report.write_report(str(tmp_path), results)
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "| reward | – | – | – | – | – | 0.750 | 3 |" in written["table"]
    assert "correctness" not in written["table"]
    assert "| 0.750 (4) | 0.500 (2) | 1.000 (1) | 1.000 (1) |" in text
    assert "| policy | arithmetic | parity |" in text
    assert "| sft | 0.00 | 1.00 |" in text
    json.dumps(results)  # what the pipeline returns stays JSON


def test_the_data_stage_writes_the_families_it_is_given(tmp_path):
    from xwin_jax.data import synthetic
    from xwin_jax.errors import ConfigError

    summary = pipeline.data_stage(str(tmp_path), num_prompts=120, annotate_prompts=32,
                                  rejection_prompts=16, eval_prompts=16,
                                  families=["copy", "arithmetic"])
    for name in ("held_out_prompts", "annotate_prompts", "rejection_prompts", "sft_train"):
        records = formats.read_sft(summary["paths"][name]).records if name == "sft_train" \
            else formats.read_prompts(summary["paths"][name]).records
        texts = [r.turns[0].content if name == "sft_train" else r.conversation.messages[0].content
                 for r in records]
        assert {synthetic.solve(t)[0] for t in texts} == {"copy", "arithmetic"}, name
    with pytest.raises(ConfigError, match="choose one or more of"):
        pipeline.data_stage(str(tmp_path / "b"), families=["count"])
