"""What `python -m xwin_jax.launch` runs: the one job a gin file binds.

    from __gin__ import dynamic_registration
    from xwin_jax import jobs
    from xwin_jax.checkpoints import hf
    jobs.run.job = @hf.convert
    jobs.run.output_dir = %CKPT_DIR

Gin-free on purpose: launch.py configures it; any other caller can use it directly. While a
job runs, `context()` tells the stage runner (train/stage.py) whether the user asked to
overwrite changed stages and how to write the gin config into each stage's directory.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

ConfigWriter = Callable[[str, bool], None]  # (directory, finished) → writes the gin config


@dataclasses.dataclass(frozen=True)
class JobContext:
    overwrite: bool = False
    config_writer: ConfigWriter | None = None


_context = JobContext()


def context() -> JobContext:
    return _context


def write_config(directory: str, finished: bool) -> None:
    """config.gin (at the start) or operative_config.gin (when finished) into `directory`,
    when the job was launched from gin."""
    if _context.config_writer is not None:
        _context.config_writer(directory, finished)


def run(job: Callable[[], Any], output_dir: str | None, overwrite: bool = False,
        config_writer: ConfigWriter | None = None) -> Any:
    """Creates `output_dir` and runs the job; returns what it returns. `overwrite`: a stage
    whose settings or inputs changed is discarded and run again instead of refused. A job
    that writes nothing (the server) binds output_dir = None."""
    global _context
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
    previous, _context = _context, JobContext(overwrite, config_writer)
    try:
        return job()
    finally:
        _context = previous


def final_dir(workdir: str, stage: str) -> str:
    """WORKDIR/<stage>/final: where a stage exports what the next one loads (for gin files
    that chain stages, e.g. POLICY_DIR = @policy/jobs.final_dir())."""
    return os.path.join(workdir, stage, "final")
