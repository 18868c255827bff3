"""Grid sweeps over gin bindings: one named run (and WORKDIR) per point of the grid.

    python launch/sweep.py --gin_file=gin/experiments/tiny_sft.gin \\
        --grid "LEARNING_RATE=[1e-3, 3e-3]" --grid "BATCH_SIZE=[4, 8]" \\
        --set TRAIN_STEPS=20 --name lr_bs --root /tmp/sweeps --mode local
    python launch/sweep.py collect --root /tmp/sweeps --name lr_bs   # sweep.csv + sweep.md

Runs are the grid's product, the last --grid varying fastest, each named from its values,
e.g. `LEARNING_RATE=0.001,BATCH_SIZE=4`, with WORKDIR <root>/<name>/<run>. Grid values are
Python/gin literals (numbers, 'quoted strings', True/False/None, lists); --set bindings are
passed to every run as they are (so they may be gin references like @foo()).

Modes:
  local  runs them one after another here (`python -m xwin_jax.launch ...`), prints
         "run i/N: name", carries on past a failed run and exits nonzero if any failed. A run
         whose same command already succeeded is skipped (its <run>/sweep_run.json says so);
         a killed run is simply started again and resumes from its checkpoint.
  tpu    starts each run on its own slice <tpu_prefix>-<i> with `launch/tpu.py run`
         (returns once they are started; collect after copying the WORKDIRs back).
  print  prints the local commands, one per line.
--dry_run prints instead of running in every mode.

collect walks <root>/<name>/<run>/**/summary.json and writes <root>/<name>/sweep.csv and
sweep.md: one row per run with its grid values and every scalar summary field (nested dicts
flattened with dots, lists left out; prefixed with the stage directory, e.g. `sft/`, when the
runs hold more than one summary each).

Stdlib only: from the project it takes only xwin_jax/redaction.py (stdlib only too), so a
command's credentials are never printed or recorded.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
from xwin_jax.redaction import redact_args  # noqa: E402
from sweep_table import (RUN_RECORD, SweepError, collect, find_summaries, read_json,
                         value_label)

THIS_DIR = os.path.dirname(os.path.abspath(__file__))
TPU_PY = os.path.join(THIS_DIR, "tpu.py")
MAX_RUN_NAME = 200  # below the 255-byte file name limit, with room for a hash suffix

BINDING_NAME = re.compile(r"^[A-Za-z_][\w./]*$")
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class GridAxis:
    binding: str        # the full gin name, e.g. LEARNING_RATE
    values: tuple       # Python values, in the order given
    arg: str            # the --grid argument, for error messages


@dataclass(frozen=True)
class Run:
    index: int
    name: str                     # directory name under <root>/<name>/
    grid: dict                    # column name -> Python value
    bindings: tuple               # (gin name, gin literal) for the grid values


# --- grid parsing and expansion (pure) -------------------------------------------------------

def split_binding(arg: str, flag: str) -> tuple[str, str]:
    name, sep, value = arg.partition("=")
    name = name.strip()
    if not sep or not value.strip():
        raise SweepError(f"{flag} {arg!r}: expected NAME=VALUE")
    if not BINDING_NAME.match(name):
        raise SweepError(f"{flag} {arg!r}: {name!r} is not a gin name (like "
                         "LEARNING_RATE or BATCH_SIZE)")
    return name, value.strip()


def parse_grid(arg: str) -> GridAxis:
    """'NAME=[v1, v2, ...]' with literal values."""
    name, text = split_binding(arg, "--grid")
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise SweepError(
            f"--grid {arg!r}: cannot read {text!r} as a list of literals; write numbers, "
            "'quoted strings' (a bare word needs quotes), True/False/None or lists, e.g. "
            f"{name}=[1e-3, 3e-3] or {name}=['adam', 'sgd']") from None
    if not isinstance(values, (list, tuple)):
        raise SweepError(f"--grid {arg!r}: the values must be a list in brackets, e.g. "
                         f"{name}=[{text}]")
    if not values:
        raise SweepError(f"--grid {arg!r}: the list of values is empty")
    labels = [safe(value_label(v)) for v in values]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            first = values[labels.index(label)]
            raise SweepError(f"--grid {arg!r}: the values {first!r} and {values[i]!r} would "
                             f"both name their runs {label!r} (listed twice, or they differ "
                             "only in characters unsafe for file names)")
    return GridAxis(name, tuple(values), arg)


def parse_grids(args: list[str]) -> list[GridAxis]:
    axes = [parse_grid(arg) for arg in args]
    seen = set()
    for arg, axis in zip(args, axes):
        if axis.binding in seen:
            raise SweepError(
                f"--grid {arg!r}: {axis.binding} is already swept by an earlier --grid")
        seen.add(axis.binding)
    return axes


def parse_sets(args: list[str]) -> list[tuple[str, str]]:
    return [split_binding(arg, "--set") for arg in args]


def column_names(axes: list[GridAxis]) -> list[str]:
    """The last component of each binding (learning_rate of a.b.learning_rate), or the whole
    name where two axes share it."""
    short = [re.split(r"[./]", axis.binding)[-1] for axis in axes]
    return [s if short.count(s) == 1 else axis.binding for s, axis in zip(short, axes)]


def safe(text: str) -> str:
    return UNSAFE_NAME_CHARS.sub("_", text)


def run_name(columns: list[str], values: tuple) -> str:
    name = ",".join(f"{safe(col)}={safe(value_label(v))}" for col, v in zip(columns, values))
    if len(name) > MAX_RUN_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_RUN_NAME - 11]}-{digest}"
    return name


def expand(axes: list[GridAxis]) -> list[Run]:
    """The grid's product in --grid order (the last axis varies fastest)."""
    columns = column_names(axes)
    runs = []
    for index, values in enumerate(itertools.product(*(axis.values for axis in axes))):
        runs.append(Run(index=index, name=run_name(columns, values),
                        grid=dict(zip(columns, values)),
                        bindings=tuple((axis.binding, repr(v)) for axis, v in zip(axes, values))))
    return runs  # names are unique: columns are, and parse_grid checked each axis's labels


def run_workdir(root: str, sweep: str, run: Run) -> str:
    return f"{root.rstrip('/')}/{sweep}/{run.name}"


def job_args(gin_files: list[str], sets: list[tuple[str, str]], run: Run,
             workdir: str) -> list[str]:
    """launch's arguments: files, the fixed bindings, the grid's, then WORKDIR (a gin string
    literal via repr, so quotes in the path survive)."""
    return ([f"--gin_file={path}" for path in gin_files]
            + [f"--gin.{name}={value}" for name, value in sets]
            + [f"--gin.{name}={value}" for name, value in run.bindings]
            + [f"--gin.WORKDIR={workdir!r}"])


def local_command(python: str, args: list[str]) -> list[str]:
    return [python, "-m", "xwin_jax.launch", *args]


def tpu_command(tpu_name: str, zone: str, project: str | None, run: Run,
                args: list[str]) -> list[str]:
    cmd = [sys.executable, TPU_PY, "run", tpu_name, f"--zone={zone}"]
    if project:
        cmd.append(f"--project={project}")
    return cmd + [f"--run_name={run.name}", "--", *args]


# --- local runs ------------------------------------------------------------------------------

def already_succeeded(record_path: str, command: list[str]) -> bool:
    # The interpreter path is left out: the same job from another venv is the same run.
    record = read_json(record_path)
    return (bool(record) and record.get("returncode") == 0
            and record.get("command", [])[1:] == redact_args(command)[1:])


def holds_other_results(record_path: str, workdir: str, command: list[str]) -> bool:
    """True when the run directory has finished results of a different command: the jobs
    would skip as "already finished" and the sweep would file old results under new
    settings."""
    record = read_json(record_path)
    return (bool(record) and record.get("command", [])[1:] != redact_args(command)[1:]
            and bool(find_summaries(workdir)))


def write_record(record_path: str, run: Run, command: list[str], returncode: int,
                 seconds: float) -> None:
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    record = {"run": run.name, "index": run.index, "grid": run.grid,
              "bindings": dict(run.bindings), "command": redact_args(command),
              "returncode": returncode, "seconds": round(seconds, 1)}
    with open(record_path + ".partial", "w") as f:
        json.dump(record, f, indent=2, default=repr)
    os.replace(record_path + ".partial", record_path)


def run_local(runs: list[Run], commands: list[list[str]], workdirs: list[str]) -> int:
    failed, skipped = [], 0
    for run, command, workdir in zip(runs, commands, workdirs):
        progress = f"run {run.index + 1}/{len(runs)}: {run.name}"
        record_path = os.path.join(workdir, RUN_RECORD)
        if already_succeeded(record_path, command):
            print(f"{progress}: already finished, skipped", flush=True)
            skipped += 1
            continue
        if holds_other_results(record_path, workdir, command):
            print(f"{progress}: REFUSED: {workdir} holds results of a different command "
                  f"(see {RUN_RECORD}); delete it or use a new --name", flush=True)
            failed.append(run.name)
            continue
        print(progress, flush=True)
        started = time.monotonic()
        returncode = subprocess.run(command).returncode
        write_record(record_path, run, command, returncode, time.monotonic() - started)
        if returncode != 0:
            print(f"{progress}: FAILED (exit {returncode}); continuing", flush=True)
            failed.append(run.name)
    done = len(runs) - len(failed) - skipped
    print(f"sweep: {len(runs)} runs, {done} finished, {skipped} skipped, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def run_commands_in_order(commands: list[list[str]]) -> int:
    failed = 0
    for command in commands:
        returncode = subprocess.run(command).returncode
        if returncode != 0:
            print(f"sweep: failed (exit {returncode}): {shlex.join(redact_args(command))}",
                  flush=True)
            failed += 1
    return 1 if failed else 0


# --- command line ----------------------------------------------------------------------------

def add_location_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the sweep's name: <root>/<name>/<run>")
    parser.add_argument("--root", required=True, help="directory that holds sweeps")


def metric_patterns(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py", allow_abbrev=False, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="collect: sweep.py collect --root R --name N [--metrics PATTERNS]")
    parser.add_argument("--gin_file", action="append", default=[], required=True,
                        help="gin file(s) for every run, in order")
    parser.add_argument("--grid", action="append", default=[], required=True,
                        metavar="NAME=[V1,V2,...]", help="a swept binding (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a binding for every run (repeatable), passed as it is")
    add_location_flags(parser)
    parser.add_argument("--mode", choices=["local", "tpu", "print"], default="print")
    parser.add_argument("--dry_run", action="store_true", help="print, do not run")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for local runs (default: this one)")
    parser.add_argument("--tpu_prefix", help="tpu mode: run i goes to slice <tpu_prefix>-<i>")
    parser.add_argument("--zone", help="tpu mode: the slices' zone")
    parser.add_argument("--project", help="tpu mode: GCP project")
    parser.add_argument("--collect", action="store_true",
                        help="local mode: collect the table when the runs are done")
    parser.add_argument("--metrics", help="with --collect: fields to keep (comma-separated "
                                          "glob patterns, e.g. 'final_*,tokens_per_s')")
    return parser


def collect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py collect", allow_abbrev=False,
                                     description="one table of the runs' summaries")
    add_location_flags(parser)
    parser.add_argument("--metrics", help="summary fields to keep (comma-separated glob "
                                          "patterns, e.g. 'final_*,tokens_per_s'); default all")
    return parser


def main_collect(argv: list[str]) -> int:
    args = collect_parser().parse_args(argv)
    try:
        csv_path, md_path, markdown = collect(args.root, args.name, metric_patterns(args.metrics))
    except SweepError as err:
        print(f"sweep.py collect: error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="", flush=True)
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


def main_sweep(argv: list[str]) -> int:
    parser = sweep_parser()
    args = parser.parse_args(argv)
    try:
        axes = parse_grids(args.grid)
        sets = parse_sets(args.set)
        if any(name == "WORKDIR" for name, _ in sets) or any(a.binding == "WORKDIR" for a in axes):
            raise SweepError("WORKDIR is set by the sweep (<root>/<name>/<run>); drop it")
        if safe(args.name) != args.name or args.name.startswith("."):
            raise SweepError(f"--name {args.name!r}: use letters, digits and ._+-")
        runs = expand(axes)
    except SweepError as err:
        parser.error(str(err))
    if args.mode == "tpu" and not (args.tpu_prefix and args.zone):
        parser.error("--mode tpu needs --tpu_prefix and --zone")

    # Local runs get an absolute root (the jobs' cwd is ours, but the table is read later);
    # in tpu mode the root is a path on the workers' shared filesystem, kept as given.
    root = args.root if args.mode == "tpu" else os.path.abspath(args.root)
    workdirs = [run_workdir(root, args.name, run) for run in runs]
    launch_args = [job_args(args.gin_file, sets, run, workdir)
                   for run, workdir in zip(runs, workdirs)]
    if args.mode == "tpu":
        commands = [tpu_command(f"{args.tpu_prefix}-{run.index}", args.zone, args.project,
                                run, a) for run, a in zip(runs, launch_args)]
    else:
        commands = [local_command(args.python, a) for a in launch_args]

    if args.mode == "print" or args.dry_run:
        for command in commands:
            print(shlex.join(redact_args(command)))
        return 0
    if args.mode == "tpu":
        return run_commands_in_order(commands)
    status = run_local(runs, commands, workdirs)
    if args.collect:
        status = max(status, main_collect(["--root", root, "--name", args.name]
                                          + (["--metrics", args.metrics] if args.metrics else [])))
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["collect"]:
        return main_collect(argv[1:])
    return main_sweep(argv)


if __name__ == "__main__":
    sys.exit(main())
