"""The training loop: kill -9 and SIGTERM resume bit-identically; NaN stops before saving."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xwin_jax.checkpoints.manager import TrainCheckpointer
from xwin_jax.checkpoints.params import load_params
from xwin_jax.data.toy import ReverseTask
from xwin_jax.models.config import preset
from xwin_jax.models.llama import init_params
from xwin_jax.train import sft
from xwin_jax.train import state as train_state
from xwin_jax.train.loop import NonFiniteError, Preempted
from xwin_jax.train.step import make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = preset("tiny")


def assert_same_params(dir_a, dir_b):
    _, a = load_params(os.path.join(dir_a, "sft", "final"))
    _, b = load_params(os.path.join(dir_b, "sft", "final"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def launch_tiny_sft(workdir, steps):
    return subprocess.Popen(
        [sys.executable, "-m", "xwin_jax.launch", "--gin_file=gin/experiments/tiny_sft.gin",
         f"--gin.WORKDIR='{workdir}'", f"--gin.DATA_DIR='{workdir.parent / 'data'}'",
         f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=256",
         "--gin.sft.train_sft.checkpoint_every=10", "--gin.sft.train_sft.eval_every=0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_then_rerun_is_bit_identical(tmp_path):
    steps = 60
    uninterrupted = launch_tiny_sft(tmp_path / "a", steps)
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stdout.read()[-3000:]

    victim = launch_tiny_sft(tmp_path / "b", steps)
    checkpoints = tmp_path / "b" / "sft" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints.exists() and any(
            p.name.isdigit() and int(p.name) >= 20 for p in checkpoints.iterdir())):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "sft" / "summary.json").exists(), "killed too late"
    saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert 20 <= saved < steps

    rerun = launch_tiny_sft(tmp_path / "b", steps)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert "resumed from step" in output
    summary = json.load(open(tmp_path / "b" / "sft" / "summary.json"))
    assert summary["resumed_from_step"] >= 20
    assert_same_params(tmp_path / "a", tmp_path / "b")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "sft" / "metrics.jsonl")
             if "train/loss" in line]
    assert steps == list(range(1, steps[-1] + 1))  # redone steps are not duplicated


class Scripted:
    """ReverseTask batches, with a hook called as each step's batch is produced."""

    vocabulary = None

    def __init__(self, on_step=None):
        self.task = ReverseTask(8, 16)
        self.seq_len = self.task.seq_len
        self.on_step = on_step

    def with_vocabulary(self, vocab):
        return self

    def fingerprint(self):
        return {"task": self.task}

    def batches(self, start_step):
        step = start_step
        while True:
            batch = self.task.local_batch(step)
            if self.on_step:
                batch = self.on_step(step, batch) or batch
            yield batch
            step += 1


def run(workdir, data, steps=8, **kwargs):
    kwargs.setdefault("optimizer", train_state.OptimizerConfig(learning_rate=1e-3))
    return sft.train_sft(str(workdir), CFG, steps, data, checkpoint_every=2,
                         async_checkpoints=False, **kwargs)


def test_sigterm_saves_and_the_same_call_resumes(tmp_path):
    run(tmp_path / "a", Scripted())

    def terminate_at_3(step, batch):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="SIGTERM at step 4"):
        run(tmp_path / "b", Scripted(terminate_at_3))
    assert TrainCheckpointer(str(tmp_path / "b" / "sft" / "checkpoints")).latest_step() == 4
    summary = run(tmp_path / "b", Scripted())
    assert summary["resumed_from_step"] == 4
    assert_same_params(tmp_path / "a", tmp_path / "b")


def test_nan_stops_the_run_and_the_last_checkpoint_is_finite(tmp_path):
    def poison_step_5(step, batch):
        if step == 5:
            batch = dict(batch, loss_weights=batch["loss_weights"] * np.float32("nan"))
        return batch

    with pytest.raises(NonFiniteError, match=r"step 6: loss = nan.*last checkpoint: step 4"):
        run(tmp_path, Scripted(poison_step_5))
    assert TrainCheckpointer(str(tmp_path / "sft" / "checkpoints")).latest_step() == 4
    restored = ocp.StandardCheckpointer().restore(
        str(tmp_path / "sft" / "checkpoints" / "4" / "state"))
    assert int(restored["step"]) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_a_run_killed_before_its_first_checkpoint_restarts_from_its_weights(hf_model_dir,
                                                                           tmp_path):
    """The checkpoint directory exists before any save; a rerun must still load init weights."""
    from xwin_jax.checkpoints.hf import load_hf

    path, _ = hf_model_dir(vocab_size=512)

    def poison_step_0(step, batch):
        if step == 0:
            return dict(batch, loss_weights=batch["loss_weights"] * np.float32("nan"))

    kwargs = dict(init_dir=path, vocabulary="bytes", async_checkpoints=False,
                  optimizer=train_state.OptimizerConfig(learning_rate=0.0))
    with pytest.raises(NonFiniteError, match="step 1"):
        sft.train_sft(str(tmp_path), CFG, 2, Scripted(poison_step_0), **kwargs)
    assert (tmp_path / "sft" / "checkpoints").is_dir()
    summary = sft.train_sft(str(tmp_path), CFG, 2, Scripted(), **kwargs)
    assert summary["resumed_from_step"] is None
    _, trained = load_params(summary["export_dir"])
    _, imported = load_hf(path, scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, trained, imported)


def test_a_non_finite_update_is_caught_after_the_step_and_never_saved(tmp_path):
    """The loss and gradient norm of step 4 are finite, but the state it produced is not: the
    run stops naming step 4 (a checkpoint step), checkpoint 2 stays the latest, nothing is
    exported."""
    base = sft.make_train_step  # what sft.fit calls

    def poisoning_train_step(loss_fn, optimizer, schedule, *args, **kwargs):
        step = base(loss_fn, optimizer, schedule, *args, **kwargs)

        def poisoned(state, batch):
            new, metrics = step(state, batch)
            bad = jax.numpy.where(state.step == 3, jax.numpy.nan, 0.0)
            new = new.replace(params=jax.tree.map(lambda x: x + bad.astype(x.dtype),
                                                  new.params))
            return new, dict(metrics, update_finite=train_state.all_finite(
                new.params).astype("float32"))
        return poisoned

    sft.make_train_step = poisoning_train_step
    try:
        with pytest.raises(NonFiniteError, match=r"step 4: the update made the parameters.*"
                                                 r"last checkpoint: step 2") as err:
            run(tmp_path, Scripted(), steps=6)
    finally:
        sft.make_train_step = base
    assert "learning rate" in err.value.hint
    assert TrainCheckpointer(str(tmp_path / "sft" / "checkpoints")).latest_step() == 2
    assert not (tmp_path / "sft" / "final").exists()
    assert not (tmp_path / "sft" / "summary.json").exists()


SMALL = preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)


def _stage_step_inputs(stage):
    """(loss_fn, params, batch) of a stage whose step is step.make_train_step."""
    from xwin_jax.models import heads
    from xwin_jax.train import dpo, reward

    rows = ReverseTask(4, 16).local_batch(0)
    if stage == "sft":
        return sft.sft_loss_fn(SMALL), init_params(SMALL, jax.random.key(0)), rows
    tokens = rows["input_tokens"]
    pairs = {"chosen_tokens": tokens, "rejected_tokens": tokens[::-1].copy(),
             "chosen_length": np.full(4, 16, np.int32), "rejected_length": np.full(4, 12, np.int32),
             "chosen_rating": np.full(4, 8.0, np.float32),
             "rejected_rating": np.full(4, 3.0, np.float32)}
    if stage == "reward":
        return (reward.reward_loss_fn(SMALL), heads.init_reward_params(SMALL, jax.random.key(0)),
                pairs)
    pairs.update(chosen_response_mask=rows["loss_weights"], rejected_response_mask=rows[
        "loss_weights"][::-1].copy(), chosen_ref_logp=np.zeros(4, np.float32),
        rejected_ref_logp=np.zeros(4, np.float32))
    return dpo.dpo_loss_fn(SMALL), init_params(SMALL, jax.random.key(0)), pairs


@pytest.mark.parametrize("stage,learning_rate,expected", [
    ("sft", 1e-3, 1.0), ("sft", 1e39, 0.0), ("reward", 1e39, 0.0), ("dpo", 1e39, 0.0)])
def test_train_steps_report_whether_the_updated_state_is_finite(stage, learning_rate,
                                                                expected):
    """1e39 overflows float32: the loss and gradient norm are finite, the update is not."""
    loss_fn, params, batch = _stage_step_inputs(stage)
    optimizer, schedule = train_state.OptimizerConfig(learning_rate=learning_rate).build(10)
    step = jax.jit(make_train_step(loss_fn, optimizer, schedule, input_tokens=lambda b: 1))
    new, metrics = step(train_state.init_state(params, optimizer), batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["update_finite"]) == expected
    assert bool(train_state.all_finite(new.params, new.opt_state)) == bool(expected)
