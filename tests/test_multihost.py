"""Two processes (jax.distributed on 127.0.0.1, gloo collectives) train like one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from xwin_jax.checkpoints.params import load_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_command(workdir, extra=()):
    return [sys.executable, "-m", "xwin_jax.launch", "--gin_file=gin/experiments/tiny_sft.gin",
            f"--gin.WORKDIR='{workdir}'", f"--gin.DATA_DIR='{workdir.parent / 'data'}'",
            "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=256",
            "--gin.sft.train_sft.learning_rate=1e-3", "--gin.sft.train_sft.checkpoint_every=3",
            "--gin.sft.train_sft.eval_every=0", *extra]


def env_with_devices(count):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={count}")
    return env


def run_two_processes(workdir, extra=()):
    port = free_port()
    workers = [subprocess.Popen(
        sft_command(workdir, ["--multihost", f"--coordinator_address=127.0.0.1:{port}",
                              "--num_processes=2", f"--process_id={i}", *extra]),
        cwd=REPO, env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    return workers, [w.communicate(timeout=600)[0] for w in workers]


def test_two_processes_match_one(tmp_path):
    workers, outputs = run_two_processes(tmp_path / "multi")
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]

    single = subprocess.run(sft_command(tmp_path / "single"), cwd=REPO, env=env_with_devices(2),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]

    _, multi_params = load_params(str(tmp_path / "multi" / "sft" / "final"))
    _, single_params = load_params(str(tmp_path / "single" / "sft" / "final"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 multi_params, single_params)
    checkpoints = sorted(os.listdir(tmp_path / "multi" / "sft" / "checkpoints"))
    assert checkpoints == ["3", "6"]


def test_a_mesh_that_does_not_split_the_batch_over_hosts_is_refused(tmp_path):
    workers, outputs = run_two_processes(
        tmp_path / "bad", ["--gin.MESH_SHAPE={'data': 1, 'fsdp': 1, 'tensor': 2}"])
    assert all(w.returncode != 0 for w in workers)
    assert any("make data*fsdp a multiple of the host count" in o for o in outputs), outputs[0][-3000:]
