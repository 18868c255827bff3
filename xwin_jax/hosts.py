"""Work that touches the filesystem once per job, on any number of hosts."""

from __future__ import annotations

from typing import Callable, TypeVar

import jax

T = TypeVar("T")


def leader_first(barrier_name: str, fn: Callable[[], T]) -> T:
    """Runs `fn` on process 0, then on every other process after a barrier.

    For idempotent preparation (writing the synthetic suite, preparing a TFDS dataset): on a
    shared disk process 0 writes and the others find the files done; on per-host disks (a TPU
    pod's workers) each host writes its own identical copy. Either way no host reads a file
    another is still writing. `barrier_name` must be the same string on every host.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(barrier_name)
    return result if jax.process_index() == 0 else fn()
