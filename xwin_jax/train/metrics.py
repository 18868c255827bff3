"""One metrics writer that fans out to metrics.jsonl, TensorBoard and a progress bar."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax

from xwin_jax.data import formats

# Dense bf16 peak per chip, for the MFU estimate; override with peak_tflops.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "tpu v4": 275.0,
               "tpu v5p": 459.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v6": 918.0}


def device_peak_flops(peak_tflops: float | None = None,
                      num_devices: int | None = None) -> float | None:
    """Peak FLOP/s of the devices a job uses (default: all), or None where unknown (CPU)."""
    if peak_tflops is None:
        kind = jax.devices()[0].device_kind.lower()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    count = jax.device_count() if num_devices is None else num_devices
    return None if peak_tflops is None else peak_tflops * 1e12 * count


class MetricsWriter:
    """Writes scalars; only process 0 writes files and shows the bar."""

    def __init__(self, directory: str, total_steps: int, initial_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, description: str = "train"):
        self.is_writer = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.is_writer:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metrics.jsonl")
        _drop_records_after(path, initial_step)  # a resumed run redoes the steps after it
        self._jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description,
                             dynamic_ncols=True, mininterval=1.0)

    def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
        if not self.is_writer:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({f"{prefix}/{k}": float(v) for k, v in scalars.items()})
        self._jsonl.write(formats.jsonl_line(record))
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                if math.isfinite(float(value)):
                    self._tb.add_scalar(f"{prefix}/{key}", float(value), step)

    def progress(self, step: int, postfix: Mapping[str, str]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._bar.n)  # redraws at most once per mininterval

    def message(self, text: str) -> None:
        if not self.is_writer:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for resource in (self._bar, self._tb, self._jsonl):
            if resource is not None:
                resource.close()


def _drop_records_after(path: str, step: int) -> None:
    """Keeps the records of steps <= step (the run resumes from that checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut off by a kill
    if len(kept) != len(lines):
        with open(path + ".partial", "w") as f:
            f.writelines(kept)
        os.replace(path + ".partial", path)
