"""Runs the job that gin files bind.

    python -m xwin_jax.launch --gin_file=gin/runs/convert.gin \
        --gin.DIRECTION="'import'" --gin.HF_DIR="'/models/llama'" --gin.CKPT_DIR="'/ckpt'"

Flags: --gin_file (repeatable, applied in order), --gin_bindings (repeatable), the shorthand
--gin.NAME=VALUE (= --gin_bindings='NAME = VALUE'), --gin_search_paths, --multihost
(jax.distributed.initialize before anything touches a device) and --verbose. The full gin
config is written into each stage's directory as config.gin when the stage starts and the
operative one as operative_config.gin when it ends (train/stage.py), both redacted
(redaction.py), as is everything the job prints. An errors.UserError is printed as one
line (and its hint) with exit status 2; --verbose adds the traceback. The only module that
knows about gin.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys
import traceback

from absl import app, flags

from xwin_jax import redaction
from xwin_jax.errors import UserError

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")

_GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "Gin config file(s), in order; found directly or under --gin_search_paths.")
_GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Individual gin bindings, applied after the files.")
_GIN_SEARCH_PATHS = flags.DEFINE_list(
    "gin_search_paths", [".", REPO_GIN_DIR], "Where to look for --gin_file and gin includes.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (pods, multi-process GPU).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (auto-detected on TPU and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error you can act on, print the traceback too (also: "
    "XWIN_VERBOSE=1). Unexpected errors always print theirs.")

# gin appends "  In call to configurable 'name' (<function ...>)" lines to errors it passes on.
_GIN_CALL_TRAIL = re.compile(r"\n\s*In call to configurable .*", re.DOTALL)
_REQUIRED_NOT_SET = re.compile(r"(\S+?)(?:/macro\.value)? set to `%gin\.REQUIRED`")


class GinConfigError(UserError, ValueError):
    """A gin file or binding could not be parsed; the message names the file or binding."""


class RequiredMacroError(GinConfigError):
    """A %gin.REQUIRED macro was left unset; `name` is the macro."""

    def __init__(self, name: str, files: list[str]):
        super().__init__(f"{name} is required by {', '.join(files)} and was not set",
                         hint=f"add --gin.{name}=<value> (strings in quotes: "
                              f"--gin.{name}=\"'...'\")")
        self.name = name


def _not_a_search_probe(record: py_logging.LogRecord) -> bool:
    # gin logs an ERROR for every search path that lacks an included file, even when a later
    # path has it; a missing file still fails loudly with the paths it tried.
    return not record.getMessage().startswith("Path not found")


def rewrite_gin_args(argv: list[str]) -> list[str]:
    """--gin.NAME=VALUE → --gin_bindings=NAME = VALUE (t5x's shorthand)."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, re.DOTALL)
        out.append(f"--gin_bindings={match.group(1)} = {match.group(2)}" if match else arg)
    return out


def find_gin_file(name: str, search_paths: list[str]) -> str:
    candidates = [name] + [os.path.join(p, name) for p in search_paths]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise GinConfigError(f"gin file {name!r} not found (looked in: {', '.join(candidates)})")


def parse_gin(files: list[str], bindings: list[str], search_paths: list[str]) -> None:
    """Parses files in order, then bindings; any error names the file or the binding."""
    import gin

    gin.clear_config()  # a second job in the same process starts from a clean slate
    if _not_a_search_probe not in py_logging.getLogger().filters:
        py_logging.getLogger().addFilter(_not_a_search_probe)
    for path in search_paths:
        gin.add_config_file_search_path(path)
    for name in files:
        path = find_gin_file(name, search_paths)
        try:
            gin.parse_config_file(path)
        except Exception as err:  # gin raises many types; all are config errors here
            raise GinConfigError(f"{path}: {_one_line(str(err))}") from err
    for binding in bindings:
        redaction.register_gin_binding(binding)  # a key given here is never shown, even if
        try:                                     # the binding fails to parse
            gin.parse_config(binding)
        except Exception as err:
            raise GinConfigError(
                f"--gin_bindings {redaction.redact_gin(binding)!r}: {_one_line(str(err))}",
                hint="values are Python literals: strings in quotes (--gin.NAME=\"'text'\"), "
                     "configurables as @name() and macros as %NAME") from err
    try:
        gin.finalize()
    except ValueError as err:  # gin's finalize hook: a %gin.REQUIRED value was not set
        required = _REQUIRED_NOT_SET.match(str(err))
        if not required:
            raise GinConfigError(f"{', '.join(files)}: {err}") from err
        raise RequiredMacroError(required.group(1), files) from err


def _write_config(output_dir: str, file_name: str, text: str) -> None:
    import jax
    if jax.process_index() != 0:  # one writer per job
        return
    with open(os.path.join(output_dir, file_name), "w") as f:
        f.write(redaction.redact_gin(text))


def run_gin_job(files: list[str], bindings: list[str],
                search_paths: list[str] | None = None):
    """Parses gin and runs the bound `xwin_jax.jobs.run`; returns the job's result."""
    import gin

    from xwin_jax import jobs

    parse_gin(files, bindings, search_paths or [".", REPO_GIN_DIR])
    try:
        configured_run = gin.get_configurable(jobs.run)
    except (ValueError, KeyError) as err:
        raise GinConfigError(
            f"{', '.join(files)}: no job is bound; a run file must import `xwin_jax.jobs` and "
            f"bind `jobs.run.job` and `jobs.run.output_dir`") from err

    def write_config(directory: str, finished: bool) -> None:
        name, text = (("operative_config.gin", gin.operative_config_str()) if finished
                      else ("config.gin", gin.config_str()))
        _write_config(directory, name, text)

    return configured_run(config_writer=write_config)


def init_multihost() -> None:
    """jax.distributed.initialize from the flags when --multihost is set; call before
    anything touches a device."""
    if not _MULTIHOST.value:
        return
    import jax
    # CPU processes (tests, CPU clusters) need a collectives backend; GPU/TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
    from xwin_jax.train.loop import Preempted  # imports jax; --help stays fast without it

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    init_multihost()
    if not _GIN_FILES.value:
        raise app.UsageError("--gin_file is required (e.g. --gin_file=gin/runs/convert.gin)")
    try:
        run_gin_job(_GIN_FILES.value, _GIN_BINDINGS.value, _GIN_SEARCH_PATHS.value)
    except UserError as err:
        if _VERBOSE.value or os.environ.get("XWIN_VERBOSE", "") not in ("", "0"):
            traceback.print_exc()
        print(describe_error(err), file=sys.stderr)
        return 2
    except Preempted as err:  # a checkpoint is saved; schedulers read 143 as "terminated"
        print(f"preempted: {err}", file=sys.stderr)
        return 143


def _one_line(message: str) -> str:
    """gin's messages continue on indented lines ("    Failed to parse token ..."): join them."""
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


def describe_error(err: UserError) -> str:
    """`error: <message>` (without gin's "In call to configurable" trail) and, where the
    error has one, `hint: <advice>` on a second line."""
    message = _GIN_CALL_TRAIL.sub("", str(err)).strip()
    prefix = "gin error" if isinstance(err, GinConfigError) else "error"
    hint = getattr(err, "hint", None)
    return f"{prefix}: {message}" + (f"\nhint: {hint}" if hint else "")


def run_main():
    redaction.redact_process_output()  # what the job prints or logs never shows a secret
    argv = rewrite_gin_args(sys.argv)
    if not any(arg.startswith(("--verbosity", "-v")) for arg in argv[1:]):
        # orbax and friends log every step of a save at INFO; keep the console for progress.
        argv.append("--verbosity=-1")
    app.run(main, argv=argv)


if __name__ == "__main__":
    run_main()
