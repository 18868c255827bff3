"""launch/tpu.py: the exact gcloud commands of every subcommand (--dry_run), quoting that
survives ssh, the missing-gcloud error, the code tarball, and the remote run/stop/logs strings
executed by a real bash against a fake home."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PY = os.path.join(REPO, "launch", "tpu.py")
sys.path.insert(0, os.path.join(REPO, "launch"))
import tpu  # noqa: E402

ZONE_PROJECT = ["--zone=us-east5-a", "--project=my-proj"]
SSH_ALL = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--worker=all"]
JOB_ARGS = ["--gin_file=gin/models/llama2_7b.gin", "--gin_file=gin/mesh/fsdp.gin",
            "--gin_file=gin/runs/sft.gin", "--gin.WORKDIR='/runs/7b sft'",
            "--gin.TRAIN_FILES=[\"/data/a.jsonl\", '/data/b c.jsonl']", "--gin.TRAIN_STEPS=1000"]


def tool(*argv, env=None):
    return subprocess.run([sys.executable, TPU_PY, *argv], capture_output=True, text=True,
                          env=env, timeout=60)


def dry_run(*argv):
    """The printed commands, each split back into its argv; nothing may run: PATH is empty,
    so a command that did run would fail loudly."""
    result = tool(*argv, "--dry_run", env={"PATH": ""})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_of(cmd):
    (command,) = [arg for arg in cmd if arg.startswith("--command=")]
    return command[len("--command="):]


def launched_argv(remote):
    """The argv after the venv's python in a `run` remote command, as the worker's shell sees
    it (up to the log redirection)."""
    words = shlex.split(remote)
    start = words.index("$HOME/xwin_venv/bin/python") + 1
    return words[start:words.index(">", start)]


def test_create_exact_command():
    assert dry_run("create", "my-tpu", *ZONE_PROJECT, "--accelerator_type=v5p-64", "--spot") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--accelerator-type=v5p-64",
         "--version=v2-alpha-tpuv5", *ZONE_PROJECT, "--spot"]]
    # An explicit runtime wins over the generation's default; no project flag when not given.
    assert dry_run("create", "t", "--zone=z", "--accelerator_type=v4-32",
                   "--version=tpu-vm-v4-base", "--preemptible") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "t", "--accelerator-type=v4-32",
         "--version=tpu-vm-v4-base", "--zone=z", "--preemptible"]]


def test_create_unknown_generation_names_the_argument():
    result = tool("create", "t", "--zone=z", "--accelerator_type=v9-8", "--dry_run")
    assert result.returncode == 2
    assert "--accelerator_type=v9-8" in result.stderr and "--version" in result.stderr


def test_sync_packs_copies_to_all_workers_and_swaps():
    pack, scp, unpack = dry_run("sync", "my-tpu", *ZONE_PROJECT)
    tarball = tpu.local_tarball("my-tpu")
    assert pack == [sys.executable, TPU_PY, "pack", f"--out={tarball}"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                   "my-tpu:xwin_jax_code.tar.gz", "--worker=all", *ZONE_PROJECT]
    assert unpack[:7] == SSH_ALL and unpack[8:] == ZONE_PROJECT
    remote = remote_of(unpack)
    assert "tar -xzf $HOME/xwin_jax_code.tar.gz -C $HOME/xwin_jax.new" in remote
    assert remote.index("rm -rf $HOME/xwin_jax &&") < remote.index(
        "mv $HOME/xwin_jax.new $HOME/xwin_jax")


def test_setup_installs_on_all_workers():
    (cmd,) = dry_run("setup", "my-tpu", *ZONE_PROJECT, "--jax_version=")
    assert cmd[:7] == SSH_ALL and cmd[8:] == ZONE_PROJECT
    steps = [step.strip() for step in remote_of(cmd).split(" && ")]
    assert "cd $HOME/xwin_jax" in steps
    assert ("$HOME/xwin_venv/bin/pip install --quiet -r requirements.txt 'jax[tpu]' -f "
            "https://storage.googleapis.com/jax-releases/libtpu_releases.html") in steps
    assert "$HOME/xwin_venv/bin/pip install --quiet --no-deps -e ." in steps
    assert steps.index("cd $HOME/xwin_jax") < steps.index(
        "$HOME/xwin_venv/bin/pip install --quiet --no-deps -e .")


def test_setup_pins_jax_to_the_local_version_by_default():
    (pinned,) = dry_run("setup", "my-tpu", *ZONE_PROJECT, "--jax_version=0.9.1")
    assert " 'jax[tpu]==0.9.1' -f " in remote_of(pinned)
    (default,) = dry_run("setup", "my-tpu", *ZONE_PROJECT)
    from importlib.metadata import version
    assert f" 'jax[tpu]=={version('jax')}' -f " in remote_of(default)


def test_up_is_create_then_sync_then_setup():
    up = dry_run("up", "my-tpu", *ZONE_PROJECT, "--accelerator_type=v5p-64")
    create = dry_run("create", "my-tpu", *ZONE_PROJECT, "--accelerator_type=v5p-64")
    sync = dry_run("sync", "my-tpu", *ZONE_PROJECT)
    setup = dry_run("setup", "my-tpu", *ZONE_PROJECT)
    assert up == create + sync + setup


def test_run_command_round_trips_through_shlex():
    (cmd,) = dry_run("run", "my-tpu", *ZONE_PROJECT, "--run_name=7b_sft", *JOB_ARGS)
    assert cmd[:7] == SSH_ALL and cmd[8:] == ZONE_PROJECT
    remote = remote_of(cmd)
    assert launched_argv(remote) == ["-m", "xwin_jax.launch", "--multihost", *JOB_ARGS]
    assert "> $HOME/xwin_logs/7b_sft.log 2>&1 < /dev/null &" in remote
    assert "setsid nohup" in remote
    # Everything after -- goes to the job verbatim, and --dry_run is never passed on.
    (cmd,) = dry_run("run", "my-tpu", "--zone=z", "--env", "XLA_FLAGS=--x y", "--",
                     "--gin_file=a.gin", "--verbosity=1")
    assert launched_argv(remote_of(cmd)) == [
        "-m", "xwin_jax.launch", "--multihost", "--gin_file=a.gin", "--verbosity=1"]
    assert "env 'XLA_FLAGS=--x y' $HOME/xwin_venv/bin/python" in remote_of(cmd)


def test_run_argument_errors_are_named():
    result = tool("run", "t", "--zone=z", "--gin_file=a.gin", "--bogus=1", "--dry_run")
    assert result.returncode == 2 and "'--bogus=1'" in result.stderr
    result = tool("run", "t", "--zone=z", "--run_name=a b", "--gin_file=a.gin", "--dry_run")
    assert result.returncode == 2 and "--run_name='a b'" in result.stderr
    result = tool("run", "t", "--zone=z", "--dry_run")
    assert result.returncode == 2 and "no job arguments" in result.stderr
    result = tool("logs", "t", "--zone=z", "--gin_file=a.gin", "--dry_run")
    assert result.returncode == 2 and "unexpected arguments" in result.stderr
    result = tool("run", "t", "--zone=z", "--run_name=latest", "--gin_file=a.gin", "--dry_run")
    assert result.returncode == 2 and "--run_name=latest" in result.stderr
    result = tool("run", "t", "--zone=z", "--gin_file=a.gin", "--gin.TRAIN_STEPS", "3",
                  "--dry_run")
    assert result.returncode == 2 and "'--gin.TRAIN_STEPS': write --gin.NAME=VALUE" in result.stderr


def test_logs_stop_exec_delete_exact_commands():
    assert dry_run("logs", "my-tpu", *ZONE_PROJECT) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--worker=0",
         "--command=tail -n 100 -F $HOME/xwin_logs/latest.log", *ZONE_PROJECT]]
    (logs,) = dry_run("logs", "my-tpu", "--zone=z", "--worker=all", "--run_name=r1",
                      "--no_follow", "--lines=5")
    assert logs[6:8] == ["--worker=all", "--command=tail -n 5 $HOME/xwin_logs/r1.log"]

    (stop,) = dry_run("stop", "my-tpu", *ZONE_PROJECT)
    assert stop[:7] == SSH_ALL and remote_of(stop).startswith(
        'pkill -TERM -f -x "$HOME/xwin_venv/bin/python -m xwin_jax[.]launch( .*)?"')
    (kill,) = dry_run("stop", "my-tpu", *ZONE_PROJECT, "--force")
    assert remote_of(kill).startswith("pkill -KILL ")

    (exec_,) = dry_run("exec", "my-tpu", *ZONE_PROJECT, "--", "python", "-c",
                       "import jax; print(jax.device_count())")
    assert exec_[:7] == SSH_ALL
    assert shlex.split(remote_of(exec_))[-3:] == [
        "python", "-c", "import jax; print(jax.device_count())"]

    assert dry_run("delete", "my-tpu", *ZONE_PROJECT) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *ZONE_PROJECT]]
    assert dry_run("delete", "my-tpu", "--zone=z", "--yes")[0][-1] == "--quiet"


def test_missing_gcloud_is_a_clear_error(tmp_path):
    # PATH holds nothing but an empty directory; the interpreter is called by its full path.
    result = tool("delete", "my-tpu", "--zone=z", env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "gcloud is not on PATH" in result.stderr and "--dry_run" in result.stderr
    assert result.stdout == ""


def test_pack_holds_the_working_tree_without_ignored_files(tmp_path):
    out = tmp_path / "code.tar.gz"
    result = tool("pack", f"--out={out}")
    assert result.returncode == 0, result.stderr
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "requirements.txt", "launch/tpu.py", "xwin_jax/launch.py",
            "tests/test_tpu_launch.py"} <= names
    assert not any(name.startswith((".venv/", "workdir/", ".git/")) or "__pycache__" in name
                   for name in names)


@pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "setsid", "nohup", "pgrep",
                                                     "pkill")),
                    reason="needs bash, setsid, nohup, pgrep and pkill")
def test_remote_run_logs_stop_in_a_real_shell(tmp_path):
    """The strings the workers get, run by bash in a fake home: the job sees the original
    argv, outlives its shell, refuses a second start, writes its log, and stops on SIGTERM."""
    home = tmp_path / "home"
    (home / "xwin_jax" / "xwin_jax").mkdir(parents=True)
    (home / "xwin_venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, home / "xwin_venv" / "bin" / "python")
    (home / "xwin_jax" / "xwin_jax" / "__init__.py").write_text("")
    pid_file = tmp_path / "job.pid"
    (home / "xwin_jax" / "xwin_jax" / "launch.py").write_text(
        "import os, signal, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('TERM', flush=True), sys.exit(0)))\n"
        "print('ARGV', sys.argv[1:], os.environ.get('XLA_FLAGS'), flush=True)\n"
        "time.sleep(60)\n")
    env = dict(os.environ, HOME=str(home))

    def remote(*argv):
        (cmd,) = dry_run(*argv)
        return subprocess.run(["bash", "-c", remote_of(cmd)], env=env, capture_output=True,
                              text=True, timeout=30)

    def log_text():
        return (home / "xwin_logs" / "r1.log").read_text()

    def wait_for(predicate):
        deadline = time.monotonic() + 15
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert predicate()

    args = ["run", "t", "--zone=z", "--run_name=r1", "--env", "XLA_FLAGS=--a b", *JOB_ARGS]
    try:
        started = remote(*args)
        assert started.returncode == 0, started.stderr
        wait_for(lambda: (home / "xwin_logs" / "r1.log").exists() and "ARGV" in log_text())
        assert f"ARGV {['--multihost', *JOB_ARGS]!r} --a b" in log_text()
        assert os.readlink(home / "xwin_logs" / "latest.log") == "r1.log"

        second = remote(*args)
        assert second.returncode == 1 and "already running" in second.stderr

        logs = remote("logs", "t", "--zone=z", "--no_follow")
        assert "ARGV" in logs.stdout

        stopped = remote("stop", "t", "--zone=z")
        assert "sent SIGTERM" in stopped.stdout
        wait_for(lambda: "\nTERM\n" in log_text())
        wait_for(lambda: "no job running" in remote("stop", "t", "--zone=z").stdout)
    finally:
        if pid_file.exists():  # only the fake job this test started
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
