"""Rejection sampling: best-of-n selection, its resumable samples file, and the SFT on winners."""

import json

import jax
import numpy as np
import pytest

from xwin_jax.checkpoints.params import load_params, save_params
from xwin_jax.data import formats
from xwin_jax.models import heads, llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import rejection

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)


def test_best_index_skips_unfinished_and_applies_the_threshold():
    scores = np.array([0.5, 2.0, 1.0])
    assert rejection.best_index(scores, np.array([True, True, True]), None) == 1
    assert rejection.best_index(scores, np.array([True, False, True]), None) == 2
    assert rejection.best_index(scores, np.array([True, False, True]), 1.5) is None
    assert rejection.best_index(scores, np.array([False, False, False]), None) is None


def make_inputs(root):
    # A policy that ends most responses quickly: EOS gets a large bias.
    params = llama.init_params(CFG, jax.random.key(0))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 2].add(0.3)
    save_params(str(root / "policy"), CFG, params)
    save_params(str(root / "rm"), CFG, heads.init_reward_params(CFG, jax.random.key(1)),
                head="score")
    formats.write_jsonl(str(root / "prompts.jsonl"),
                        [{"prompt": f"Tell me about {i}."} for i in range(5)])


def sample(root, stage_dir, **kwargs):
    return rejection.rejection_sample(
        str(stage_dir), str(root / "prompts.jsonl"), str(root / "policy"), str(root / "rm"),
        CFG, num_samples=6, batch_size=4, max_new_tokens=12, max_prompt_len=128, **kwargs)


def test_samples_are_scored_best_is_chosen_and_a_killed_run_resumes(tmp_path):
    make_inputs(tmp_path)
    selection = sample(tmp_path, tmp_path / "a")
    lines = (tmp_path / "a" / rejection.SAMPLES_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(range(5))
    for r in records:
        assert len(r["responses"]) == 6 == len(r["scores"])
        finished = np.array(r["finished"])
        if finished.any():
            assert r["best"] == int(np.argmax(np.where(finished, r["scores"], -np.inf)))
    assert selection["kept"] == sum(r["best"] is not None for r in records) > 0
    assert selection["mean_best_score"] >= selection["mean_score"]
    best = formats.read_sft(str(tmp_path / "a" / rejection.BEST_FILE)).records
    assert len(best) == selection["kept"]
    # The selection is made again from the saved samples: a new threshold applies to them.
    with pytest.raises(ValueError, match="above the threshold"):
        sample(tmp_path, tmp_path / "a", threshold=1e9)
    # Resuming with other sampling settings would mix two distributions: refused.
    with pytest.raises(ValueError, match="num_samples"):
        rejection.rejection_sample(
            str(tmp_path / "a"), str(tmp_path / "prompts.jsonl"), str(tmp_path / "policy"),
            str(tmp_path / "rm"), CFG, num_samples=5, batch_size=4, max_new_tokens=12,
            max_prompt_len=128)
    # Killed after two prompts (and half a line): the rerun completes the same file.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / rejection.SAMPLES_FILE).write_text("\n".join(lines[:2]) + "\n"
                                                         + lines[2][:30])
    sample(tmp_path, tmp_path / "b")
    assert (tmp_path / "b" / rejection.SAMPLES_FILE).read_text().splitlines() == lines


def test_train_rejection_fine_tunes_on_the_winners(tmp_path):
    make_inputs(tmp_path)
    summary = rejection.train_rejection(
        str(tmp_path), CFG, 3, str(tmp_path / "prompts.jsonl"),
        policy_dir=str(tmp_path / "policy"), reward_dir=str(tmp_path / "rm"), num_samples=4,
        sample_batch_size=4, max_new_tokens=12, max_prompt_len=128, batch_size=2,
        seq_len=256, learning_rate=1e-3, async_checkpoints=False,
        partitioner=Partitioner({"data": 1, "fsdp": 1, "tensor": 1}))
    assert summary["selection"]["num_samples"] == 4 and summary["steps"] == 3
    assert load_params(summary["export_dir"])[0] == CFG
    again = rejection.train_rejection(
        str(tmp_path), CFG, 3, str(tmp_path / "prompts.jsonl"),
        policy_dir=str(tmp_path / "policy"), reward_dir=str(tmp_path / "rm"))
    assert again == summary  # finished: the rerun is a no-op
