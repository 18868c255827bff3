"""What `python -m xwin_jax.launch` runs: the one job a gin file binds.

    from __gin__ import dynamic_registration
    from xwin_jax import jobs
    from xwin_jax.checkpoints import hf
    jobs.run.job = @hf.convert
    jobs.run.output_dir = %CKPT_DIR

Gin-free on purpose: launch.py configures it; any other caller can use it directly.
"""

from __future__ import annotations

import os
from typing import Any, Callable


def run(job: Callable[[], Any], output_dir: str | None,
        on_start: Callable[[str], None] | None = None) -> Any:
    """Creates `output_dir`, calls `on_start(output_dir)` (launch writes the gin config there),
    then runs the job and returns what it returns. A job that writes nothing (the server)
    binds output_dir = None: no directory is made and no config is written."""
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        if on_start is not None:
            on_start(output_dir)
    return job()


def final_dir(workdir: str, stage: str) -> str:
    """WORKDIR/<stage>/final: where a stage exports what the next one loads (for gin files
    that chain stages, e.g. POLICY_DIR = @policy/jobs.final_dir())."""
    return os.path.join(workdir, stage, "final")
