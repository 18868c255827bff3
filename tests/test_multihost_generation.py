"""The generating stages on two processes (jax.distributed on 127.0.0.1, gloo collectives, one
CPU device each) write what one process with two devices writes: the generate job's files
byte for byte (and a resume on one host), PPO's exports (through a SIGTERM and a resume) and
rejection sampling's samples and fine-tune. Both sides decode in the same layout
(decoding.DecodeLayout.tensor=1: each weight whole on every device, the batch over the
devices); otherwise one process would split each weight over its two devices, and
tensor-parallel sums round differently."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import write_policy_and_reward
from test_multihost import (run_one_process, run_processes, saved_steps, sigterm_when,
                            start_processes)

from xwin_jax.checkpoints.params import load_params
from xwin_jax.data import converters, formats
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.models import llama

CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)
# Short and long prompts: with the chat template they fall in two length buckets (192, 256).
PROMPTS = ["Hi.", "Say a 1.", "Write a long and careful answer about the number seven.",
           "Name two colours.", "Explain, step by step and with an example, how rain forms.",
           "Ok?", "List three birds that cannot fly, and say why not.", "Say bb 7.",
           "Why is the sky blue?", "Tell me a short story about a cat and a very old boat."]
SAME_LAYOUT = "--gin.decoding.DecodeLayout.tensor=1"


def launch(*args):
    return [sys.executable, "-m", "xwin_jax.launch", *args]


def assert_succeeded(workers, outputs):
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]


def assert_one_succeeded(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def assert_params_close(a_dir, b_dir, atol=1e-5):
    (a_cfg, a), (b_cfg, b) = load_params(str(a_dir)), load_params(str(b_dir))
    assert a_cfg == b_cfg
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random tiny policy (EOS biased, so some responses end) and reward model, both with
    the byte vocabulary, and a prompts file of mixed lengths."""
    root = tmp_path_factory.mktemp("models")
    write_policy_and_reward(root, CFG, ByteVocabulary())
    formats.write_jsonl(str(root / "prompts.jsonl"), [{"prompt": p} for p in PROMPTS])
    widths = {converters.bucket_width(len(converters.prompt_ids(p.conversation,
                                                                ByteVocabulary(), 1024)))
              for p in formats.read_prompts(str(root / "prompts.jsonl")).records}
    assert widths == {192, 256}
    return root


# --- the generate job ----------------------------------------------------------------------

GENERATE_BATCH = 4


def generate_command(models, out_dir):
    """Sampling at temperature 0.7 (the job's default), 8 new tokens, batches of 4."""
    return launch("--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/generate.gin",
                  f"--gin.CKPT_DIR='{models / 'policy'}'",
                  f"--gin.PROMPTS='{models / 'prompts.jsonl'}'", f"--gin.OUTPUT_DIR='{out_dir}'",
                  f"--gin.generate.generate_job.batch_size={GENERATE_BATCH}",
                  "--gin.generate.generate_job.max_new_tokens=8", SAME_LAYOUT)


def test_generate_on_two_hosts_writes_one_host_s_files_and_resumes_on_one(models, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert_one_succeeded(run_one_process(generate_command(models, single)))
    assert_succeeded(*run_processes(generate_command(models, multi)))
    for name in ("outputs.jsonl", "alpaca_eval.json"):
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
    records = [json.loads(line) for line in open(single / "outputs.jsonl")]
    assert sorted(r["index"] for r in records) == list(range(len(PROMPTS)))
    assert len({r["output"] for r in records}) > 1

    # What a kill after the first batch leaves (no summary), resumed by ONE process: it
    # generates the other batches and ends with the same files.
    lines = (multi / "outputs.jsonl").read_text().splitlines(keepends=True)
    (multi / "outputs.jsonl").write_text("".join(lines[:GENERATE_BATCH]))
    os.remove(multi / "summary.json")
    resumed = run_one_process(generate_command(models, multi))
    assert_one_succeeded(resumed)
    summary = json.load(open(multi / "summary.json"))
    assert summary["generated_now"] == len(PROMPTS) - GENERATE_BATCH
    for name in ("outputs.jsonl", "alpaca_eval.json"):
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name


# --- PPO -----------------------------------------------------------------------------------

PPO_STEPS = 4  # SIGTERM lands in the 2nd or 3rd: the resume has iterations left to run


def ppo_command(models, workdir):
    """PPO, FSDP over every device: batches of 4 prompts, 2 minibatches, 16 new tokens, a
    checkpoint every iteration."""
    return launch("--gin_file=gin/models/tiny.gin", "--gin_file=gin/mesh/fsdp.gin",
                  "--gin_file=gin/runs/ppo.gin", f"--gin.WORKDIR='{workdir}'",
                  f"--gin.TRAIN_STEPS={PPO_STEPS}", "--gin.BATCH_SIZE=4",
                  f"--gin.PROMPTS='{models / 'prompts.jsonl'}'",
                  f"--gin.POLICY_DIR='{models / 'policy'}'",
                  f"--gin.REWARD_DIR='{models / 'rm'}'", "--gin.MAX_PROMPT_LEN=256",
                  "--gin.LEARNING_RATE=1e-3", "--gin.VALUE_LEARNING_RATE=2e-3",
                  "--gin.ppo.PPOConfig.max_new_tokens=16", "--gin.ppo.PPOConfig.epochs=2",
                  "--gin.ppo.PPOConfig.num_minibatches=2",
                  "--gin.ppo.train_ppo.checkpoint_every=1", SAME_LAYOUT)


def test_ppo_on_two_hosts_preempted_and_resumed_matches_one_host(models, tmp_path):
    """SIGTERM to one host after the first checkpoint: both save the same iteration and
    exit; the same command resumes there and ends with one uninterrupted process's policy
    and value model."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert_one_succeeded(run_one_process(ppo_command(models, single)))

    workers = start_processes(ppo_command(models, multi))
    outputs = sigterm_when(workers, lambda: saved_steps(multi / "ppo" / "checkpoints"))
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 143, output[-4000:]
    assert any("preempted: SIGTERM at step" in o for o in outputs), outputs[1][-3000:]
    stopped = saved_steps(multi / "ppo" / "checkpoints")[-1]
    assert 1 <= stopped < PPO_STEPS and not (multi / "ppo" / "summary.json").exists()

    workers, outputs = run_processes(ppo_command(models, multi))
    assert_succeeded(workers, outputs)
    assert f"resumed from step {stopped}" in outputs[0]

    for export in ("final", "final_value"):
        assert_params_close(multi / "ppo" / export, single / "ppo" / export)
    summaries = [json.load(open(d / "ppo" / "summary.json")) for d in (multi, single)]
    assert summaries[0]["resumed_from_step"] == stopped
    assert summaries[0]["final_kl_beta"] == pytest.approx(summaries[1]["final_kl_beta"])


# --- rejection sampling --------------------------------------------------------------------

def rejection_command(models, workdir):
    """Best-of-4 over the first 6 prompts (batches of 8 rows), then 3 fine-tune steps."""
    return launch("--gin_file=gin/models/tiny.gin", "--gin_file=gin/mesh/fsdp.gin",
                  "--gin_file=gin/runs/rejection.gin", f"--gin.WORKDIR='{workdir}'",
                  "--gin.TRAIN_STEPS=3", f"--gin.PROMPTS='{models / 'prompts.jsonl'}'",
                  f"--gin.POLICY_DIR='{models / 'policy'}'",
                  f"--gin.REWARD_DIR='{models / 'rm'}'", "--gin.NUM_SAMPLES=4",
                  "--gin.LEARNING_RATE=1e-3",
                  "--gin.rejection.train_rejection.max_prompts=6",
                  "--gin.rejection.train_rejection.sample_batch_size=8",
                  "--gin.rejection.train_rejection.max_new_tokens=12",
                  "--gin.rejection.train_rejection.max_prompt_len=256",
                  "--gin.rejection.train_rejection.batch_size=2",
                  "--gin.rejection.train_rejection.seq_len=384", SAME_LAYOUT)


def test_rejection_sampling_on_two_hosts_matches_one_host(models, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert_one_succeeded(run_one_process(rejection_command(models, single)))
    assert_succeeded(*run_processes(rejection_command(models, multi)))

    def samples(workdir):
        return {r["index"]: r for r in map(json.loads, open(workdir / "xwin_set" /
                                                              "samples.jsonl"))}

    ours, theirs = samples(multi), samples(single)
    assert sorted(ours) == sorted(theirs) == list(range(6))
    for index, record in theirs.items():
        assert ours[index]["responses"] == record["responses"]
        assert ours[index]["finished"] == record["finished"]
        assert ours[index]["num_tokens"] == record["num_tokens"]
        np.testing.assert_allclose(ours[index]["scores"], record["scores"], atol=1e-5)
    assert any(any(r["finished"]) for r in theirs.values())
    best = [(d / "xwin_set" / "best_of_n.jsonl").read_text() for d in (multi, single)]
    assert best[0] == best[1]
    assert_params_close(multi / "rejection" / "final", single / "rejection" / "final")
