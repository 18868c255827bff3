"""The quickstart pipeline through launch, as `make quickstart` runs it (with fewer steps), and
the model gin files."""

import glob
import json
import os

import pytest

from xwin_jax import launch
from xwin_jax.models.config import LlamaConfig, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The quickstart with its budgets cut down: what the test suite can afford on 2 cores.
REDUCED = ["pipeline.model_stage.num_tokens = 3", "MAX_NEW_TOKENS = 48",
           "sft/sft.train_sft.train_steps = 300", "pipeline.data_stage.annotate_prompts = 384",
           "reward/reward.train_reward.train_steps = 60",
           "pipeline.data_stage.rejection_prompts = 192",
           "rejection/rejection.train_rejection.train_steps = 60",
           "ppo/ppo.train_ppo.train_steps = 8", "ppo/prompts_data.PromptsData.batch_size = 32",
           "dpo/dpo.train_dpo.train_steps = 40", "pipeline.data_stage.eval_prompts = 192"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("quickstart"))
    bindings = [f"WORKDIR = '{workdir}'"] + REDUCED
    return workdir, bindings, launch.run_gin_job(["experiments/quickstart.gin"], bindings)


def test_every_aligned_stage_beats_sft_on_the_held_out_judge_score(quickstart):
    _, _, results = quickstart
    sft = results["eval/sft"]
    assert sft["win_rate_vs_sft"] == 50.0  # SFT against itself: all draws
    for stage in ("rejection", "ppo", "dpo"):
        row = results[f"eval/{stage}"]
        assert row["judge_score"] > sft["judge_score"] + 0.05, (stage, row, sft)
        assert row["win_rate_vs_sft"] > 50.0, (stage, row)
    # PPO's KL to the reference stays bounded and non-negative beyond noise.
    with open(os.path.join(quickstart[0], "ppo", "metrics.jsonl")) as f:
        kl = [r["train/kl_k3"] for r in map(json.loads, f) if "train/kl_k3" in r]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert all(0 <= value < 30 for value in kl), kl


def test_report_model_stage_and_resume(quickstart, capsys):
    workdir, bindings, results = quickstart
    report = open(os.path.join(workdir, "report.md")).read()
    for stage in ("| sft |", "| reward |", "| rejection |", "| ppo |",
                  "| dpo (Xwin-Set, rejected: lowest) |"):
        assert stage in report
    dpo_pairs = results["dpo"]["train_data"]  # DPO on Xwin-Set: a pair per usable prompt
    assert dpo_pairs["rejected_rule"] == "lowest"
    assert dpo_pairs["pairs"] + sum(dpo_pairs["prompts_skipped"].values()) == 192
    assert "DPO on Xwin-Set:" in report
    correctness = results["eval/correctness"]  # every held-out pair, split by kind
    kinds = correctness["reward_pairs"]["by_kind"]
    assert sum(k["pairs"] for k in kinds.values()) == correctness["reward_pairs"]["pairs"] > 0
    assert {"correct_vs_wrong", "length"} <= set(kinds)
    assert set(correctness["task_accuracy_by_family"]) == {"sft", "rejection", "ppo", "dpo"}
    assert "## Correctness" in report and "| policy | arithmetic |" in report
    for plot in ("loss_curves.png", "ppo.png"):
        assert os.path.getsize(os.path.join(workdir, plot)) > 1000
    model = results["model"]
    assert model["round_trip_max_abs_logit_diff"] == 0.0 and len(model["greedy_token_ids"]) == 3
    assert all(0 <= t < preset("tiny").vocab_size for t in model["greedy_token_ids"])
    # Each stage's config sits in its own directory, with the values that stage used.
    for stage in ("sft", "reward", "ppo", "eval/ppo"):
        assert os.path.exists(os.path.join(workdir, stage, "config.gin")), stage
    operative = open(os.path.join(workdir, "reward", "operative_config.gin")).read()
    assert "reward/reward.train_reward" in operative
    assert 0.5 < results["reward"]["final_eval"]["accuracy"] <= 1.0
    capsys.readouterr()
    again = launch.run_gin_job(["experiments/quickstart.gin"], bindings)
    out = capsys.readouterr().out
    assert out.count("already") >= 10  # every stage is skipped
    assert again["eval/ppo"] == results["eval/ppo"]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin"))))
def test_model_gin_files_build_their_preset(path):
    import gin
    launch.parse_gin([path], ["config.preset.remat_policy = 'full'"], [REPO])
    cfg = gin.query_parameter("%MODEL").scoped_configurable_fn()
    name = os.path.basename(path)[:-len(".gin")]
    assert isinstance(cfg, LlamaConfig)
    assert cfg == preset(name, remat_policy="full")
