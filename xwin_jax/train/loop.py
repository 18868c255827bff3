"""The one training loop every stage shares: batches → jitted step → hooks.

It does not care where batches come from: `batches(start_step)` yields process-local NumPy
batches from `start_step` on, which is also how a resumed run continues at the same example.
What happens after each step is a list of hooks, in order:

  StopOnNonFinite  a non-finite loss, gradient norm or updated state (the step's
                   `update_finite` metric) stops the run before that state is saved
  LogMetrics       metrics to TensorBoard / JSONL / the progress bar (metrics.py)
  Evaluate         eval_fn every `eval_every` steps and at the end
  (extra hooks)    whatever a stage adds
  Checkpoint       every `checkpoint_every` steps (async), on SIGTERM, and at the end; a
                   restart resumes from the latest one
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from xwin_jax.checkpoints.manager import TrainCheckpointer
from xwin_jax.errors import ConfigError, UserError
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.metrics import MetricsWriter, device_peak_flops

Batches = Callable[[int], Iterator[Mapping[str, np.ndarray]]]
CHECKPOINT_DIR = "checkpoints"


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


def _to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


@dataclasses.dataclass
class Run:
    """What hooks see and change: the state after the step, the writer, the checkpointer."""
    state: Any
    num_steps: int
    description: str
    writer: MetricsWriter
    checkpointer: TrainCheckpointer
    stop: _StopFlag
    last_saved: int | None = None
    tokens_seen: int = 0
    last_metrics: dict = dataclasses.field(default_factory=dict)
    eval_metrics: dict = dataclasses.field(default_factory=dict)

    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.state, {"step": step, "tokens_seen": self.tokens_seen,
                                                  "data_position": step})
        self.last_saved = step

    def describe_last_checkpoint(self) -> str:
        return (f"step {self.last_saved} in {self.checkpointer.directory}"
                if self.last_saved is not None
                else "none yet; a rerun starts from the initial weights")


class Hook:
    """Work after a step (`done` steps are finished; `metrics` are host floats) and once at
    the end of a run. A hook stops the run by raising."""

    def after_step(self, run: Run, done: int, metrics: dict) -> None:
        pass

    def at_end(self, run: Run) -> None:
        pass


class StopOnNonFinite(Hook):
    def __init__(self, checked: tuple[str, ...] = ("loss", "grad_norm")):
        self.checked = checked

    def after_step(self, run, done, metrics):
        problem = non_finite_problem(metrics, self.checked)
        if problem:
            run.checkpointer.wait()  # the last good checkpoint is complete on disk
            raise NonFiniteError(
                f"step {done}: {problem}; stopped without saving this state (last "
                f"checkpoint: {run.describe_last_checkpoint()})",
                hint="lower the learning rate (or raise warmup_steps) or check the data for "
                     "extreme examples, then rerun: training resumes from the last checkpoint")


class LogMetrics(Hook):
    """Adds step time, tokens/s and MFU to the step's metrics and writes them."""

    def __init__(self, start_step: int, flops_per_token: float | None, peak: float | None):
        self.start_step, self.flops_per_token, self.peak = start_step, flops_per_token, peak
        self.train_time, self.timed_tokens = 0.0, 0

    def after_step(self, run, done, metrics):
        tokens, elapsed = int(metrics["num_input_tokens"]), metrics.pop("step_time_s")
        run.tokens_seen += tokens
        if done - 1 > self.start_step:  # the first step of a run includes compilation
            self.train_time += elapsed
            self.timed_tokens += tokens
        scalars = dict(metrics, step_time_s=elapsed, tokens_per_s=tokens / elapsed,
                       tokens_seen=run.tokens_seen)
        if self.flops_per_token and self.peak:
            scalars["mfu"] = tokens / elapsed * self.flops_per_token / self.peak
        run.writer.write(done, scalars)
        run.last_metrics = scalars
        postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{scalars['tokens_per_s']:,.0f}"}
        if "mfu" in scalars:
            postfix["mfu"] = f"{scalars['mfu']:.1%}"
        run.writer.progress(done, postfix)

    def summary(self) -> dict:
        out = {"train_time_s": round(self.train_time, 3),
               "tokens_per_s": self.timed_tokens / self.train_time if self.train_time else None}
        if self.flops_per_token and self.peak and self.train_time:
            out["mfu"] = self.timed_tokens / self.train_time * self.flops_per_token / self.peak
        return out


class Evaluate(Hook):
    def __init__(self, eval_fn: Callable[[Any], Mapping[str, float]], every: int = 0):
        self.eval_fn, self.every = eval_fn, every

    def _run(self, run: Run, step: int) -> None:
        run.eval_metrics = dict(self.eval_fn(run.state))
        run.writer.write(step, run.eval_metrics, prefix="eval")

    def after_step(self, run, done, metrics):
        if self.every and done % self.every == 0:
            self._run(run, done)
            run.writer.message(f"[{run.description}] step {done}: " + ", ".join(
                f"eval {k} {v:.4f}" for k, v in run.eval_metrics.items()))

    def at_end(self, run):
        if not run.eval_metrics or not self.every or run.num_steps % self.every:
            self._run(run, run.num_steps)


class Checkpoint(Hook):
    def __init__(self, every: int):
        if every < 0:
            raise ConfigError(f"checkpoint_every={every}: use N >= 1, or 0 for only the final "
                              f"step (and SIGTERM)")
        self.every = every

    def after_step(self, run, done, metrics):
        stopping = run.stop.any_host()
        if (self.every and done % self.every == 0) or done == run.num_steps or stopping:
            run.save(done)
        if stopping:
            run.checkpointer.wait()
            raise Preempted(f"SIGTERM at step {done}: checkpoint saved in "
                            f"{run.checkpointer.directory}; rerun the same command to resume")


def train_loop(*, stage_dir: str, num_steps: int, partitioner: Partitioner,
               init_state: Callable[[], Any], abstract_state: Any,
               train_step: Callable[[Any, dict], tuple[Any, Mapping[str, jax.Array]]],
               batches: Batches, checkpoint_every: int = 100, keep_checkpoints: int = 3,
               async_checkpoints: bool = True,
               eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
               eval_every: int = 0, hooks: Sequence[Hook] = (),
               flops_per_token: float | None = None, peak_tflops: float | None = None,
               description: str = "train") -> tuple[Any, dict]:
    """Runs (or resumes) training to `num_steps`; returns (final state, summary dict).

    `abstract_state` is the state's ShapeDtypeStruct tree with shardings (the restore
    target, so resuming never builds the initial state); `train_step` returns metrics that
    include `loss`, `grad_norm` and `num_input_tokens`. `hooks` run after the standard ones
    and before the checkpoint (see the module docstring).
    """
    checkpoint_hook = Checkpoint(checkpoint_every)
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
    if latest is not None:
        writer.message(f"[{description}] resumed from step {start_step} "
                       f"({checkpointer.directory})")
    log = LogMetrics(start_step, flops_per_token,
                     device_peak_flops(peak_tflops, partitioner.mesh.size))
    all_hooks = [StopOnNonFinite(), log] + ([Evaluate(eval_fn, eval_every)] if eval_fn else []) \
        + list(hooks) + [checkpoint_hook]
    try:
        with _StopFlag() as stop:
            run = Run(state, num_steps, description, writer, checkpointer, stop,
                      last_saved=latest, tokens_seen=tokens_seen)
            data = batches(start_step)
            for step in range(start_step, num_steps):
                batch = partitioner.shard_batch(next(data))
                began = time.perf_counter()
                run.state, metrics = train_step(run.state, batch)
                metrics = _to_python(metrics)  # waits for the step
                metrics["step_time_s"] = time.perf_counter() - began
                for hook in all_hooks:
                    hook.after_step(run, step + 1, metrics)
            for hook in all_hooks:
                hook.at_end(run)
    finally:
        checkpointer.close()
        writer.close()
    summary = {
        "steps": num_steps,
        "resumed_from_step": start_step if latest is not None else None,
        "final_train_loss": run.last_metrics.get("loss"),
        "final_metrics": run.last_metrics,
        "final_eval": run.eval_metrics,
        "tokens_seen": run.tokens_seen,
        **log.summary(),
    }
    return run.state, summary
