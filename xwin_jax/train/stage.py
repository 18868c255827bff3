"""The one stage runner: every stage and job (SFT, RM, DPO, PPO, RS, generate, annotate,
evaluate, conversion, the quickstart's steps) runs through `run_stage`.

    summary = run_stage(stage_dir, "sft", settings, body)

  STAGE_DIR/fingerprint.json      what determines the result (fingerprint.py): the resolved
                                  settings and the identity of every input, by content
  STAGE_DIR/config.gin            the gin config the stage started with (when launched by gin)
  STAGE_DIR/operative_config.gin  the values it used, written when it finishes
  STAGE_DIR/summary.json          written last: its presence marks the stage as finished,
                                  unless it says "incomplete" (e.g. pairs the judge could not
                                  judge yet)

A rerun with the same fingerprint skips a finished stage and resumes an unfinished or
incomplete one (its body resumes from its checkpoint or its appended outputs). A rerun whose
fingerprint differs is refused with the settings that differ, unless the job was started with
overwrite (`--gin.jobs.run.overwrite=True`), which clears the stage directory and runs it
again. A directory that holds another job's results is never reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import jax

from xwin_jax import fingerprint as fingerprints
from xwin_jax import jobs
from xwin_jax.errors import ConfigError
from xwin_jax.partitioning import sync_hosts

EXPORT_DIR = "final"
SUMMARY_FILE = "summary.json"
FINGERPRINT_FILE = "fingerprint.json"
# What a stage leaves behind that its own earlier run may have written (a directory without
# a fingerprint that holds any of these was written by an older version of the project).
_RESULT_NAMES = (SUMMARY_FILE, "checkpoints", EXPORT_DIR, "outputs.jsonl", "samples.jsonl",
                 "pairs.jsonl", "annotations.json", "model_config.json")


class StageChanged(ConfigError):
    """A stage directory holds results of other settings or inputs; names what differs."""


def read_json(path: str) -> Any | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value: Any) -> str:
    """Atomically (host 0 only)."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".partial", "w") as f:
            json.dump(value, f, indent=2)
        os.replace(path + ".partial", path)
    return path


def write_summary(stage_dir: str, summary: dict) -> str:
    return write_json(os.path.join(stage_dir, SUMMARY_FILE), summary)


# Kept when a stage is cleared: paid judge verdicts, keyed by everything that decides them
# (what was judged, the judge model, its prompt's version), so a verdict found there is the
# one the new settings would pay for again. Delete the file to ask the judge anew.
KEPT_ON_OVERWRITE = ("judge_cache.jsonl",)


def _clear(stage_dir: str, name: str) -> None:
    sync_hosts(f"clear {name}: read")  # every host has read the old fingerprint
    if jax.process_index() == 0:
        kept = {n: open(os.path.join(stage_dir, n), "rb").read() for n in KEPT_ON_OVERWRITE
                if os.path.isfile(os.path.join(stage_dir, n))}
        shutil.rmtree(stage_dir)
        os.makedirs(stage_dir)
        for filename, data in kept.items():
            with open(os.path.join(stage_dir, filename), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if kept:
            print(f"[{name}] kept {', '.join(kept)} (cached judge verdicts are reused; delete "
                  f"it to ask the judge again)")
    sync_hosts(f"clear {name}")


def _prepare(stage_dir: str, name: str, tree: Any, overwrite: bool) -> bool:
    """Refuses, clears or accepts the stage directory; True when the stage already finished
    with this fingerprint."""
    path = os.path.join(stage_dir, FINGERPRINT_FILE)
    recorded = read_json(path)
    how = (f"run it in a new directory, or add --gin.jobs.run.overwrite=True to discard "
           f"{stage_dir} and run this stage again")
    if recorded is None:
        leftovers = [n for n in _RESULT_NAMES if os.path.exists(os.path.join(stage_dir, n))]
        if leftovers:
            if not overwrite:
                raise StageChanged(
                    f"{stage_dir} holds results ({', '.join(leftovers)}) but no "
                    f"{FINGERPRINT_FILE}: written by an older version, so it cannot tell "
                    f"which settings produced them", hint=how)
            _clear(stage_dir, name)
        return False
    if recorded.get("job") != name:
        raise StageChanged(f"{stage_dir} holds the results of the {recorded.get('job')!r} "
                           f"job; the {name!r} job needs a directory of its own",
                           hint="give this job another directory (e.g. a subdirectory)")
    if recorded["digest"] == fingerprints.digest(tree):
        summary = read_json(os.path.join(stage_dir, SUMMARY_FILE))
        if summary and summary.get("incomplete"):
            print(f"[{name}] {summary['incomplete']}: resuming {stage_dir}")
            return False
        return summary is not None
    if overwrite:
        print(f"[{name}] settings changed; overwrite is set: discarding {stage_dir}")
        _clear(stage_dir, name)
        return False
    differences = fingerprints.changes(recorded["fingerprint"], tree)
    raise StageChanged(
        f"{stage_dir} was produced with other settings or inputs than this command's "
        f"(before → now): " + "; ".join(differences), hint=how)


def run_stage(stage_dir: str, name: str, settings: dict, body: Callable[[str], dict]) -> dict:
    """Runs `body(stage_dir) -> summary` unless it already finished with these settings
    (see the module docstring). `settings` holds everything that determines the result
    (fingerprint.describe); leave out what does not (checkpoint cadence, logging, progress
    bars, the mesh). A summary with "incomplete" (saying what is missing) is written too,
    and the same command resumes the stage."""
    stage_dir = os.path.abspath(stage_dir)
    tree = fingerprints.describe(settings)
    overwrite = jobs.context().overwrite
    finished = _prepare(stage_dir, name, tree, overwrite) if os.path.isdir(stage_dir) \
        else False
    if finished:
        print(f"[{name}] already finished with these settings "
              f"({os.path.join(stage_dir, SUMMARY_FILE)})")
        return read_json(os.path.join(stage_dir, SUMMARY_FILE))
    os.makedirs(stage_dir, exist_ok=True)
    write_json(os.path.join(stage_dir, FINGERPRINT_FILE),
               {"job": name, "digest": fingerprints.digest(tree), "fingerprint": tree})
    jobs.write_config(stage_dir, finished=False)
    sync_hosts(f"{name} started")  # every host has read the directory before anyone writes
    started = time.perf_counter()
    summary = dict(body(stage_dir))
    summary.setdefault("stage", name)
    summary["wall_time_s"] = round(time.perf_counter() - started, 2)
    summary["fingerprint"] = fingerprints.digest(tree)
    jobs.write_config(stage_dir, finished=True)
    path = write_summary(stage_dir, summary)
    sync_hosts(f"{name} finished")  # what host 0 wrote is there before any host reads it
    if jax.process_index() == 0:
        print(f"[{name}] done in {summary['wall_time_s']} s → {path}")
    return summary


def export(stage_dir: str, cfg, params: Any, vocabulary: Any, *, kind: str = "lm",
           name: str = EXPORT_DIR) -> str:
    """STAGE_DIR/<name>: the params checkpoint the next stage loads, with its tokenizer."""
    from xwin_jax.checkpoints.params import save_params
    directory = os.path.join(stage_dir, name)
    save_params(directory, cfg, params, head=kind, vocabulary=vocabulary)
    return directory
