"""Two processes (jax.distributed on 127.0.0.1, gloo collectives) train like one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from xwin_jax.checkpoints.params import load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_command(workdir, extra=()):
    """Tiny SFT on the synthetic suite read through seqio from prepared TFDS files, in two
    data shards (one per host, or both on one host)."""
    return [sys.executable, "-m", "xwin_jax.launch",
            "--gin_file=gin/experiments/tiny_sft_seqio.gin",
            f"--gin.WORKDIR='{workdir}'", f"--gin.DATA_DIR='{workdir.parent / 'data'}'",
            f"--gin.TFDS_DIR='{workdir.parent / 'tfds'}'", "--gin.TRAIN_STEPS=30",
            "--gin.BATCH_SIZE=4", "--gin.seqio_sft_data.SeqioSftData.num_shards=2",
            "--gin.LEARNING_RATE=1e-3", "--gin.sft.train_sft.checkpoint_every=5",
            "--gin.sft.train_sft.eval_every=0", *extra]


def env_with_devices(count):
    """The environment of a process that sees `count` CPU devices."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")


def start_processes(command, count=2):
    """`command` (a launch command line) as the `count` processes of one jax.distributed job
    on 127.0.0.1 (gloo collectives), one CPU device each; their output is piped."""
    port = free_port()
    return [subprocess.Popen(
        [*command, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={count}", f"--process_id={i}"],
        cwd=REPO, env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(count)]


def outputs_of(workers, timeout=600):
    """Each process's output, once it has exited."""
    return [w.communicate(timeout=timeout)[0] for w in workers]


def run_processes(command, count=2):
    workers = start_processes(command, count)
    return workers, outputs_of(workers)


def run_one_process(command, devices=2):
    """`command` as one process that sees `devices` CPU devices; its CompletedProcess."""
    return subprocess.run(command, cwd=REPO, env=env_with_devices(devices),
                          capture_output=True, text=True, timeout=600)


def start_two_processes(workdir, extra=()):
    return start_processes(sft_command(workdir, extra))


def run_two_processes(workdir, extra=()):
    return run_processes(sft_command(workdir, extra))


def saved_steps(checkpoints):
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) \
        if checkpoints.exists() else []


def sigterm_when(workers, ready, victim=1, timeout=300):
    """Once ready() holds (or a process has exited, or after `timeout` s), SIGTERM to
    workers[victim]; returns every process's output."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and all(w.poll() is None for w in workers):
        time.sleep(0.02)
    workers[victim].send_signal(signal.SIGTERM)
    return outputs_of(workers)


def test_two_processes_preempted_and_resumed_match_one_process(tmp_path):
    """Each host packs its own seqio shard; SIGTERM to one host makes both save the same
    step and exit; the rerun resumes there, and the result equals one uninterrupted process
    reading both shards."""
    multi = tmp_path / "multi"
    workers = start_two_processes(multi)
    outputs = sigterm_when(workers, lambda: saved_steps(multi / "sft" / "checkpoints"))
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 143, output[-4000:]
    assert any("preempted: SIGTERM at step" in o for o in outputs), outputs[1][-3000:]
    stopped = saved_steps(multi / "sft" / "checkpoints")[-1]
    assert 5 <= stopped < 30 and not (multi / "sft" / "summary.json").exists()

    workers, outputs = run_two_processes(multi)
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]
    assert f"resumed from step {stopped}" in outputs[0]

    single = run_one_process(sft_command(tmp_path / "single"))
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]

    _, multi_params = load_params(str(multi / "sft" / "final"))
    _, single_params = load_params(str(tmp_path / "single" / "sft" / "final"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 multi_params, single_params)
    summaries = [json.load(open(d / "sft" / "summary.json")) for d in (multi, tmp_path / "single")]
    assert summaries[0]["resumed_from_step"] == stopped
    assert summaries[0]["tokens_seen"] == summaries[1]["tokens_seen"] > 0
    assert summaries[0]["final_train_loss"] == pytest.approx(summaries[1]["final_train_loss"],
                                                              abs=1e-5)


def test_a_mesh_that_does_not_split_the_batch_over_hosts_is_refused(tmp_path):
    workers, outputs = run_two_processes(
        tmp_path / "bad", ["--gin.MESH_SHAPE={'data': 1, 'fsdp': 1, 'tensor': 2}"])
    assert all(w.returncode != 0 for w in workers)
    assert any("make data*fsdp a multiple of the host count" in o for o in outputs), \
        outputs[0][-3000:]
