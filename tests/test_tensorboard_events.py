"""The TensorBoard event files a job writes read back with TensorBoard's own reader."""

import glob
import json
import math
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xwin_jax.data.toy import ReverseTask
from xwin_jax.models.config import preset
from xwin_jax.train import sft
from xwin_jax.train.metrics import MetricsWriter


def read_scalars(directory):
    """{tag: [(step, value)]} of the event files under DIRECTORY/tensorboard."""
    files = glob.glob(os.path.join(directory, "tensorboard", "events.out.tfevents.*"))
    assert files, f"no event file under {directory}/tensorboard"
    events = EventAccumulator(os.path.join(directory, "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_metrics_writer_scalars_read_back(tmp_path):
    writer = MetricsWriter(str(tmp_path), total_steps=3, progress=False)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "accuracy": 0.25 * step,
                            "grad_norm": float("nan") if step == 2 else 0.5})
    writer.write(3, {"loss": 0.75}, prefix="eval")
    writer.close()

    scalars = read_scalars(str(tmp_path))
    assert set(scalars) == {"train/loss", "train/accuracy", "train/grad_norm", "eval/loss"}
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3], rel=1e-6)
    assert [v for _, v in scalars["train/accuracy"]] == pytest.approx([0.25, 0.5, 0.75])
    assert scalars["train/grad_norm"] == [(1, 0.5), (3, 0.5)]  # NaN: JSONL only
    assert scalars["eval/loss"] == [(3, 0.75)]
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert math.isnan(records[1]["train/grad_norm"])


def test_a_training_stage_logs_the_same_scalars_to_tensorboard_and_jsonl(tmp_path):
    sft.train_sft(str(tmp_path), preset("tiny"), 3, ReverseTask(8, 16), checkpoint_every=10,
                  async_checkpoints=False)
    stage_dir = str(tmp_path / "sft")
    scalars = read_scalars(stage_dir)
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        logged = [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in logged],
                                                                  rel=1e-6)
    assert {"train/accuracy", "train/grad_norm", "train/learning_rate"} <= set(scalars)
