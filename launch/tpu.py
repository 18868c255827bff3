"""Cloud TPU VMs and pod slices for xwin_jax, through `gcloud compute tpus tpu-vm`.

    # a v5p-64 slice (8 hosts), code and venv on every worker, then a 7B SFT on all of them
    python launch/tpu.py up my-tpu --zone=us-east5-a --accelerator_type=v5p-64
    python launch/tpu.py run my-tpu --zone=us-east5-a --run_name=sft7b \\
        --gin_file=gin/models/llama2_7b.gin --gin_file=gin/mesh/fsdp.gin \\
        --gin_file=gin/runs/sft.gin --gin.WORKDIR="'/mnt/shared/runs/7b_sft'" ...
    python launch/tpu.py logs my-tpu --zone=us-east5-a            # tail -F worker 0's log
    python launch/tpu.py stop my-tpu --zone=us-east5-a            # SIGTERM: checkpoint, exit
    python launch/tpu.py delete my-tpu --zone=us-east5-a

Subcommands: create, sync, setup, up (= create, sync, setup), run, logs, stop, exec, delete,
and pack (the tarball `sync` ships). Every one takes --dry_run: it prints the commands it
would run, one per line and shell-quoted, so they can be pasted into a shell, and runs none.

Stdlib only, so it runs on a laptop that has neither JAX nor the project installed; from the
project it takes only xwin_jax/redaction.py (stdlib only too), by path, so that no command it
prints shows a credential. Command building is pure (`<subcommand>_commands(args) -> list[argv]`);
only `execute` touches the outside world.

On every worker: the code lives in ~/xwin_jax, the venv in ~/xwin_venv, logs in
~/xwin_logs/<run_name>.log (plus a `latest.log` link). WORKDIR and the data must be paths that
every worker sees (a gcsfuse mount or an NFS/Filestore share): all hosts write checkpoints.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

THIS_FILE = os.path.abspath(__file__)
REPO_ROOT = os.path.dirname(os.path.dirname(THIS_FILE))
sys.path.insert(0, REPO_ROOT)
from xwin_jax.redaction import redact_args  # noqa: E402

# Remote paths are written with $HOME (expanded by the worker's shell), never quoted.
REMOTE_CODE_DIR = "$HOME/xwin_jax"
REMOTE_VENV = "$HOME/xwin_venv"
REMOTE_LOG_DIR = "$HOME/xwin_logs"
REMOTE_TARBALL = "xwin_jax_code.tar.gz"  # relative to the remote home (scp's convention)
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
PYTHON_VERSION = "3.11"  # pyproject's requires-python; TPU images ship Ubuntu's 3.10

# The runtime image for each TPU generation when --version is not given.
DEFAULT_RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# The job `run` starts, matched against whole command lines (pgrep -x), so the `bash -c`
# wrapping a remote command that mentions xwin_jax.launch never matches itself, and only jobs
# of this venv do. Double-quoted: the worker's shell expands $HOME and nothing else.
JOB_PATTERN = f'"{REMOTE_VENV}/bin/python -m xwin_jax[.]launch( .*)?"'

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=.*$", re.DOTALL)


class CommandError(RuntimeError):
    """A command could not be built or run; the message says which and why."""


# --- command building (pure) -----------------------------------------------------------------

def gcloud_tpu(args, verb: str, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ...REST --zone=.. [--project=..]`."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def ssh(args, remote_command: str, worker: str = "all") -> list[str]:
    # gcloud hands --command to ssh as one string, so the worker's shell parses it exactly once.
    return gcloud_tpu(args, "ssh", args.name, f"--worker={worker}", f"--command={remote_command}")


def runtime_version(accelerator_type: str, version: str | None) -> str:
    if version:
        return version
    generation = accelerator_type.split("-")[0]
    if generation not in DEFAULT_RUNTIME:
        raise CommandError(
            f"--accelerator_type={accelerator_type}: no default runtime for {generation!r}; "
            f"pass --version (known: {', '.join(sorted(DEFAULT_RUNTIME))})")
    return DEFAULT_RUNTIME[generation]


def create_commands(args) -> list[list[str]]:
    cmd = gcloud_tpu(args, "create", args.name,
                     f"--accelerator-type={args.accelerator_type}",
                     f"--version={runtime_version(args.accelerator_type, args.version)}")
    if args.spot:
        cmd.append("--spot")
    if args.preemptible:
        cmd.append("--preemptible")
    return [cmd]


def local_tarball(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"xwin_jax_code_{name}.tar.gz")


def unpack_remote_command() -> str:
    # Unpack beside the old tree, then swap: a worker never sees half a checkout, and files
    # deleted locally disappear remotely (scp --recurse would leave them behind).
    new = f"{REMOTE_CODE_DIR}.new"
    return " && ".join([
        f"rm -rf {new}", f"mkdir -p {new}",
        f"tar -xzf $HOME/{REMOTE_TARBALL} -C {new}",
        f"rm -rf {REMOTE_CODE_DIR}", f"mv {new} {REMOTE_CODE_DIR}",
        f"rm -f $HOME/{REMOTE_TARBALL}",
        'echo "$(hostname): code synced to ~/xwin_jax"',
    ])


def sync_commands(args) -> list[list[str]]:
    """Pack the working tree (tracked + untracked, not ignored), copy it to every worker,
    unpack it in place of the old copy."""
    tarball = local_tarball(args.name)
    return [
        [sys.executable, THIS_FILE, "pack", f"--out={tarball}"],
        gcloud_tpu(args, "scp", tarball, f"{args.name}:{REMOTE_TARBALL}", "--worker=all"),
        ssh(args, unpack_remote_command()),
    ]


def local_jax_version() -> str | None:
    """The jax this checkout is tested with, to pin on the workers (None if not installed)."""
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return None


def setup_remote_command(jax_version: str | None = None) -> str:
    pip = f"{REMOTE_VENV}/bin/pip"
    jax_tpu = f"'jax[tpu]=={jax_version}'" if jax_version else "'jax[tpu]'"
    return " && ".join([
        # uv fetches a Python that satisfies requires-python whatever the image ships.
        "(command -v uv >/dev/null || python3 -m pip install --user --quiet uv"
        " || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"([ -x {REMOTE_VENV}/bin/python ]"
        f" || uv venv --seed --python {PYTHON_VERSION} {REMOTE_VENV})",
        f"cd {REMOTE_CODE_DIR}",
        # -f: older jax releases take libtpu from Google's index; newer ones ignore it.
        f"{pip} install --quiet -r requirements.txt {jax_tpu} -f {LIBTPU_FIND_LINKS}",
        f"{pip} install --quiet --no-deps -e .",
        f"{REMOTE_VENV}/bin/python -c 'import jax, socket, xwin_jax; "
        "print(socket.gethostname(), \"jax\", jax.__version__, \"ready\")'",
    ])


def setup_commands(args) -> list[list[str]]:
    return [ssh(args, setup_remote_command(args.jax_version))]


def up_commands(args) -> list[list[str]]:
    # setup installs requirements.txt from the synced tree, so sync comes before it.
    return create_commands(args) + sync_commands(args) + setup_commands(args)


def job_argv(job_args: list[str]) -> list[str]:
    """What every worker runs, after the interpreter."""
    return ["-m", "xwin_jax.launch", "--multihost", *job_args]


def run_remote_command(run_name: str, job_args: list[str], env: list[str]) -> str:
    log = f"{REMOTE_LOG_DIR}/{shlex.quote(run_name)}.log"
    python = " ".join(["env", *map(shlex.quote, env), f"{REMOTE_VENV}/bin/python"]
                      if env else [f"{REMOTE_VENV}/bin/python"])
    already_running = (
        f"if pgrep -f -x {JOB_PATTERN} >/dev/null; then "
        'echo "$(hostname): an xwin_jax job is already running; '
        'stop it first (launch/tpu.py stop)" >&2; exit 1; fi')
    return " && ".join([
        f"mkdir -p {REMOTE_LOG_DIR}", f"cd {REMOTE_CODE_DIR}",
        f"{{ {already_running}; }}",
        f"ln -sfn {shlex.quote(run_name)}.log {REMOTE_LOG_DIR}/latest.log",
        # setsid + nohup + no tty: the job outlives the ssh session that started it.
        f"{{ setsid nohup {python} {shlex.join(job_argv(job_args))} > {log} 2>&1 < /dev/null & }}",
        f'echo "$(hostname): started {run_name}, log ~/xwin_logs/{run_name}.log"',
    ])


def run_commands(args) -> list[list[str]]:
    if not args.job_args:
        raise CommandError("run: no job arguments; pass --gin_file=... [--gin.NAME=VALUE ...] "
                           "(or anything for xwin_jax.launch after --)")
    return [ssh(args, run_remote_command(args.run_name, args.job_args, args.env))]


def logs_commands(args) -> list[list[str]]:
    log = f"{REMOTE_LOG_DIR}/{shlex.quote(args.run_name)}.log"
    follow = [] if args.no_follow else ["-F"]
    return [ssh(args, shlex.join(["tail", "-n", str(args.lines), *follow]) + f" {log}",
                worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
    signal = "KILL" if args.force else "TERM"
    remote = (f"pkill -{signal} -f -x {JOB_PATTERN} && "
              f'echo "$(hostname): sent SIG{signal}" || echo "$(hostname): no job running"')
    return [ssh(args, remote)]


def exec_commands(args) -> list[list[str]]:
    if not args.job_args:
        raise CommandError("exec: no command; put it after --, e.g. exec NAME -- python -c "
                           "'import jax; print(jax.device_count())'")
    remote = (f"cd {REMOTE_CODE_DIR} && export PATH=\"{REMOTE_VENV}/bin:$PATH\" && "
              f"{shlex.join(args.job_args)}")
    return [ssh(args, remote, worker=args.worker)]


def delete_commands(args) -> list[list[str]]:
    cmd = gcloud_tpu(args, "delete", args.name)
    if args.yes:
        cmd.append("--quiet")  # gcloud otherwise asks before deleting
    return [cmd]


COMMANDS = {
    "create": create_commands, "sync": sync_commands, "setup": setup_commands,
    "up": up_commands, "run": run_commands, "logs": logs_commands, "stop": stop_commands,
    "exec": exec_commands, "delete": delete_commands,
}


# --- pack: the tarball sync ships ------------------------------------------------------------

def code_files(repo_root: str = REPO_ROOT) -> list[str]:
    """Tracked and untracked-but-not-ignored files (the working tree as edited, without .venv,
    workdir/ or caches); files deleted locally are skipped."""
    try:
        listing = subprocess.run(
            ["git", "-C", repo_root, "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise CommandError(f"pack: cannot list the files of {repo_root} with git ({err}); "
                           "sync needs a git checkout") from err
    names = sorted({name for name in listing.decode().split("\0") if name})
    return [name for name in names if os.path.lexists(os.path.join(repo_root, name))]


def pack(out: str, repo_root: str = REPO_ROOT) -> int:
    files = code_files(repo_root)
    partial = out + ".partial"
    with tarfile.open(partial, "w:gz") as tar:
        for name in files:
            tar.add(os.path.join(repo_root, name), arcname=name, recursive=False)
    os.replace(partial, out)
    return len(files)


# --- running ---------------------------------------------------------------------------------

def execute(commands: list[list[str]], dry_run: bool) -> int:
    """Prints the commands (dry run) or runs them in order, output streaming, stopping at the
    first failure. Returns the exit status."""
    if dry_run:
        for cmd in commands:
            print(shlex.join(redact_args(cmd)))
        return 0
    if any(cmd[0] == "gcloud" for cmd in commands) and shutil.which("gcloud") is None:
        raise CommandError(
            "gcloud is not on PATH: install the Google Cloud CLI "
            "(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, "
            "or add --dry_run to print the commands instead")
    for cmd in commands:
        print(f"+ {shlex.join(redact_args(cmd))}", file=sys.stderr, flush=True)
        returncode = subprocess.run(cmd).returncode
        if returncode != 0:
            print(f"tpu.py: command failed (exit {returncode}): "
                  f"{shlex.join(redact_args(cmd[:6]))} ...",
                  file=sys.stderr)
            return returncode
    return 0


# --- command line ----------------------------------------------------------------------------

def split_job_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(tool argv, job argv): everything after the first `--` goes to the job verbatim, except
    --dry_run: launch has no such flag, and a dry run typed at the end of the line must never
    turn into a real run."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    after = argv[cut + 1:]
    dry_run = ["--dry_run"] if "--dry_run" in after else []
    return argv[:cut] + dry_run, [arg for arg in after if arg != "--dry_run"]


def gin_passthrough(unknown: list[str]) -> list[str]:
    """Arguments argparse did not know: allowed when they are launch's gin flags
    (--gin_file, --gin_bindings, --gin_search_paths, --gin.NAME=VALUE) and their values."""
    previous_takes_value = False
    for arg in unknown:
        if arg.startswith("--gin.") and "=" not in arg:
            raise CommandError(f"{arg!r}: write --gin.NAME=VALUE with '=' (launch reads the "
                               "shorthand only in that form)")
        if arg.startswith("--gin"):
            previous_takes_value = "=" not in arg
        elif previous_takes_value and not arg.startswith("-"):
            previous_takes_value = False
        else:
            raise CommandError(f"unrecognized argument {arg!r} (only --gin* flags pass through "
                               "to the job; put anything else after --)")
    return unknown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu.py", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def subcommand(name, help_text, tpu=True):
        sub = subparsers.add_parser(name, help=help_text, description=help_text,
                                    allow_abbrev=False)
        if tpu:
            sub.add_argument("name", help="TPU VM / slice name")
            sub.add_argument("--zone", required=True, help="e.g. us-east5-a")
            sub.add_argument("--project", default=None,
                             help="GCP project (default: gcloud's configured project)")
        sub.add_argument("--dry_run", action="store_true",
                         help="print the commands, one per line, and run nothing")
        return sub

    def creation_flags(sub):
        sub.add_argument("--accelerator_type", required=True, help="e.g. v5p-64, v4-32")
        sub.add_argument("--version", default=None,
                         help="TPU runtime, e.g. v2-alpha-tpuv5 (default: by generation: "
                              + ", ".join(f"{k}→{v}" for k, v in DEFAULT_RUNTIME.items()) + ")")
        kind = sub.add_mutually_exclusive_group()
        kind.add_argument("--spot", action="store_true", help="Spot VMs (can be reclaimed)")
        kind.add_argument("--preemptible", action="store_true", help="preemptible VMs")

    creation_flags(subcommand("create", "create the TPU VM or pod slice"))
    subcommand("sync", "copy this working tree (git ls-files) to ~/xwin_jax on every worker")
    def setup_flags(sub):
        sub.add_argument("--jax_version", default=local_jax_version(),
                         help="pin jax[tpu] to this version (default: the local jax, so the "
                              "workers run what the tests ran; '' for the newest)")

    setup_flags(subcommand("setup", "create ~/xwin_venv and install the requirements and "
                                    "jax[tpu] on every worker (run sync first)"))
    up = subcommand("up", "create, sync and setup in order")
    creation_flags(up)
    setup_flags(up)

    run = subcommand("run", "start `python -m xwin_jax.launch --multihost ...` on every "
                            "worker under nohup; extra --gin* flags (or anything after --) "
                            "go to the job")
    run.add_argument("--run_name", default="job",
                     help="log file name on the workers: ~/xwin_logs/<run_name>.log")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable for the job (repeatable); shown in ps and in "
                          "--dry_run output, so not for secrets")

    logs = subcommand("logs", "tail -F the job's log")
    logs.add_argument("--run_name", default="latest", help="default: the last run started")
    logs.add_argument("--worker", default="0", help="worker index or 'all' (default 0)")
    logs.add_argument("--lines", type=int, default=100, help="lines of history first")
    logs.add_argument("--no_follow", action="store_true", help="print and return")

    stop = subcommand("stop", "SIGTERM the job on every worker (it checkpoints and exits; "
                              "the same run command resumes it)")
    stop.add_argument("--force", action="store_true", help="SIGKILL instead (no checkpoint)")

    exec_ = subcommand("exec", "run a command (after --) in ~/xwin_jax with the venv on PATH")
    exec_.add_argument("--worker", default="all", help="worker index or 'all' (default all)")

    delete = subcommand("delete", "delete the TPU VM or slice (teardown)")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    pack_ = subcommand("pack", "write the tarball that sync copies (git ls-files of this tree)",
                       tpu=False)
    pack_.add_argument("--out", default=local_tarball("code"), help="tarball path (.tar.gz)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    tool_argv, after_dashes = split_job_args(argv)
    args, unknown = parser.parse_known_args(tool_argv)
    try:
        passthrough = gin_passthrough(unknown)
    except CommandError as err:
        parser.error(str(err))
    args.job_args = passthrough + after_dashes
    if args.job_args and args.command not in ("run", "exec"):
        parser.error(f"{args.command}: unexpected arguments {args.job_args} "
                     "(only run and exec pass arguments on)")
    if args.command == "exec" and passthrough:
        parser.error("exec: put the command after --")
    if args.command == "run":
        if args.run_name == "latest":
            parser.error("--run_name=latest: that name is the link to the last run's log; "
                         "pick another")
        if not RUN_NAME.match(args.run_name):
            parser.error(f"--run_name={args.run_name!r}: use letters, digits and ._=,+- "
                         "(it names the log file)")
        for assignment in args.env:
            if not ENV_ASSIGNMENT.match(assignment):
                parser.error(f"--env={assignment!r}: expected KEY=VALUE")
    if args.command == "logs" and not RUN_NAME.match(args.run_name):
        parser.error(f"--run_name={args.run_name!r}: use letters, digits and ._=,+-")
    if args.command in ("logs", "exec") and not re.fullmatch(r"all|\d+", args.worker):
        parser.error(f"--worker={args.worker!r}: a worker index or 'all'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "pack":
            if args.dry_run:  # the files it would pack
                print("\n".join(code_files()))
                return 0
            count = pack(args.out)
            print(f"packed {count} files into {args.out}", file=sys.stderr)
            return 0
        return execute(COMMANDS[args.command](args), args.dry_run)
    except CommandError as err:
        print(f"tpu.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
