"""The one training loop every stage shares: batches → jitted step → metrics → checkpoint → eval.

It does not care where batches come from: `batches(start_step)` yields process-local NumPy
batches from `start_step` on, which is also how a resumed run continues at the same example.
Checkpoints are saved every `checkpoint_every` steps (async), on SIGTERM, and at the end; a
restart resumes from the latest one. A non-finite loss, gradient norm or updated state (the
step's `update_finite` metric) stops the run before that state could be saved or exported.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from xwin_jax.checkpoints.manager import TrainCheckpointer
from xwin_jax.errors import ConfigError, UserError
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.metrics import MetricsWriter, device_peak_flops

Batches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"


def finished_summary(stage_dir: str, stage: str) -> dict | None:
    """The summary of a stage that already finished (its rerun is a no-op), else None."""
    path = os.path.join(stage_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    print(f"[{stage}] already finished ({path}); delete it to run again")
    with open(path) as f:
        return json.load(f)


def write_summary(stage_dir: str, summary: dict) -> str:
    """Writes STAGE_DIR/summary.json atomically (host 0 only); its presence marks the stage
    as finished."""
    path = os.path.join(stage_dir, SUMMARY_FILE)
    if jax.process_index() == 0:
        os.makedirs(stage_dir, exist_ok=True)
        with open(path + ".partial", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".partial", path)
    return path


class NonFiniteError(UserError, RuntimeError):
    """The loss, the gradient norm or the updated state became NaN/Inf; the message names the
    step."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved and the same command resumes the run."""


class _StopFlag:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def any_host(self) -> bool:
        """True when any host got SIGTERM, so all of them save the same step together."""
        if jax.process_count() == 1:
            return self.raised
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.int32(self.raised)).any())

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def non_finite_problem(metrics: Mapping[str, float],
                       checked: tuple[str, ...] = ("loss", "grad_norm")) -> str | None:
    """What is non-finite about a step — one of its `checked` metrics, or the state the
    update produced (the step's `update_finite` metric) — or None when all is well."""
    for name in checked:
        if name in metrics and not math.isfinite(metrics[name]):
            return f"{name} = {metrics[name]}"
    if metrics.get("update_finite", 1.0) != 1.0:
        values = ", ".join(f"{name} = {metrics[name]}" for name in checked if name in metrics)
        return f"the update made the parameters or optimizer state non-finite ({values})"
    return None


def _describe_checkpoint(step: int | None, checkpointer: TrainCheckpointer) -> str:
    return (f"step {step} in {checkpointer.directory}" if step is not None
            else "none yet; a rerun starts from the initial weights")


def _to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def train_loop(*, stage_dir: str, num_steps: int, partitioner: Partitioner,
               init_state: Callable[[], Any], abstract_state: Any,
               train_step: Callable[[Any, dict], tuple[Any, Mapping[str, jax.Array]]],
               batches: Batches, checkpoint_every: int = 100, keep_checkpoints: int = 3,
               async_checkpoints: bool = True,
               eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
               eval_every: int = 0, flops_per_token: float | None = None,
               peak_tflops: float | None = None, description: str = "train"
               ) -> tuple[Any, dict]:
    """Runs (or resumes) training to `num_steps`; returns (final state, summary dict).

    `abstract_state` is the state's ShapeDtypeStruct tree with shardings (the restore
    target, so resuming never builds the initial state); `train_step` returns metrics that
    include `loss`, `grad_norm` and `num_input_tokens`.
    """
    checkpointer = TrainCheckpointer(os.path.join(stage_dir, CHECKPOINT_DIR), keep_checkpoints,
                                     async_checkpoints)
    start_step, tokens_seen = 0, 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(latest, abstract_state)
        start_step, tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
    else:
        state = init_state()
    writer = MetricsWriter(stage_dir, num_steps, start_step, description=description)
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every={checkpoint_every}: use N >= 1, or 0 for only "
                          f"the final step (and SIGTERM)")
    if latest is not None:
        writer.message(f"[{description}] resumed from step {start_step} "
                       f"({checkpointer.directory})")
    peak = device_peak_flops(peak_tflops, partitioner.mesh.size)
    last_saved = latest
    train_time, timed_tokens, eval_metrics, last_metrics = 0.0, 0, {}, {}

    def save(step):
        nonlocal last_saved
        checkpointer.save(step, state, {"step": step, "tokens_seen": tokens_seen,
                                        "data_position": step})
        last_saved = step

    try:
        with _StopFlag() as stop:
            data = batches(start_step)
            for step in range(start_step, num_steps):
                batch = partitioner.shard_batch(next(data))
                began = time.perf_counter()
                state, metrics = train_step(state, batch)
                metrics = _to_python(metrics)  # waits for the step
                elapsed = time.perf_counter() - began
                done = step + 1
                problem = non_finite_problem(metrics)
                if problem:
                    checkpointer.wait()  # the last good checkpoint is complete on disk
                    raise NonFiniteError(
                        f"step {done}: {problem}; stopped without saving this state (last "
                        f"checkpoint: {_describe_checkpoint(last_saved, checkpointer)})",
                        hint="lower the learning rate (or raise warmup_steps) or check the "
                             "data for extreme examples, then rerun: training resumes from "
                             "the last checkpoint")
                tokens = int(metrics["num_input_tokens"])
                tokens_seen += tokens
                if step > start_step:  # the first step of a run includes compilation
                    train_time += elapsed
                    timed_tokens += tokens
                scalars = dict(metrics, step_time_s=elapsed, tokens_per_s=tokens / elapsed,
                               tokens_seen=tokens_seen)
                if flops_per_token and peak:
                    scalars["mfu"] = tokens / elapsed * flops_per_token / peak
                writer.write(done, scalars)
                last_metrics = scalars
                postfix = {"loss": f"{metrics['loss']:.4f}",
                           "tok/s": f"{scalars['tokens_per_s']:,.0f}"}
                if "mfu" in scalars:
                    postfix["mfu"] = f"{scalars['mfu']:.1%}"
                writer.progress(done, postfix)
                if eval_fn is not None and eval_every and done % eval_every == 0:
                    eval_metrics = dict(eval_fn(state))
                    writer.write(done, eval_metrics, prefix="eval")
                    writer.message(f"[{description}] step {done}: " + ", ".join(
                        f"eval {k} {v:.4f}" for k, v in eval_metrics.items()))
                stopping = stop.any_host()
                if (checkpoint_every and done % checkpoint_every == 0) or done == num_steps \
                        or stopping:
                    save(done)
                if stopping:
                    checkpointer.wait()
                    raise Preempted(f"SIGTERM at step {done}: checkpoint saved in "
                                    f"{checkpointer.directory}; rerun the same command to resume")
        if eval_fn is not None and (not eval_metrics or not eval_every
                                    or num_steps % eval_every):
            eval_metrics = dict(eval_fn(state))
            writer.write(num_steps, eval_metrics, prefix="eval")
    finally:
        checkpointer.close()
        writer.close()
    summary = {
        "steps": num_steps,
        "resumed_from_step": start_step if latest is not None else None,
        "final_train_loss": last_metrics.get("loss"),
        "final_metrics": last_metrics,
        "final_eval": eval_metrics,
        "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 3),
        "tokens_per_s": timed_tokens / train_time if train_time else None,
    }
    if flops_per_token and peak and train_time:
        summary["mfu"] = timed_tokens / train_time * flops_per_token / peak
    return state, summary
