"""Work that touches the filesystem once per job, on any number of hosts."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np

from xwin_jax.errors import UserError

T = TypeVar("T")


class LeaderFailed(UserError, RuntimeError):
    """Process 0's part of a leader-first step failed; its own log has the cause."""


def leader_first(barrier_name: str, fn: Callable[[], T]) -> T:
    """Runs `fn` on process 0, then on every other process.

    For idempotent preparation (writing the synthetic suite, preparing a TFDS dataset): on a
    shared disk process 0 writes and the others find the files done; on per-host disks (a TPU
    pod's workers) each host writes its own identical copy. Either way no host reads a file
    another is still writing. Process 0 broadcasts whether it succeeded, which is also the
    barrier, so a failure there stops every host with a message instead of a hang.
    `barrier_name` names the step in that message.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the others have been told
            error = err
    succeeded = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
        raise error
    if not int(succeeded):
        raise LeaderFailed(f"{barrier_name}: failed on process 0 (see its log)")
    return result if jax.process_index() == 0 else fn()
