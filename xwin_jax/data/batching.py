"""What every batch source shares: global batch k is a pure function of k; each host takes
its own rows; `batches(start_step)` is what the training loop iterates (and resumes) with."""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from xwin_jax.errors import ConfigError


class GlobalBatches:
    """Subclasses set `batch_size` and define `global_batch(step)`."""
    batch_size: int

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch `step`."""
        count, index = jax.process_count(), jax.process_index()
        if self.batch_size % count:
            raise ConfigError(f"batch_size={self.batch_size} does not split over {count} hosts")
        rows = self.batch_size // count
        return {k: v[index * rows:(index + 1) * rows]
                for k, v in self.global_batch(step).items()}

    def batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            yield self.local_batch(step)
            step += 1
