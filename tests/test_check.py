"""xwin_jax.check: the devices and the mesh a gin file would build, without running the job."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "xwin_jax.check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def mesh_sizes(stdout):
    match = re.search(r"^mesh: data=(\d+) fsdp=(\d+) tensor=(\d+) \((\d+) devices", stdout,
                      re.MULTILINE)
    assert match, stdout
    return tuple(int(g) for g in match.groups())


def test_fsdp_mesh_over_eight_devices():
    result = run_check("--gin_file=gin/mesh/fsdp.gin")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert mesh_sizes(out) == (1, 8, 1, 8)
    assert re.search(r"^jax \S+, backend cpu$", out, re.MULTILINE)
    assert "processes: 1 (this is process 0)" in out
    assert "local devices: 8" in out and "global devices: 8" in out
    assert re.search(r"embed\s+→ fsdp", out)           # the rule table is printed
    assert re.search(r"act_batch\s+→ \('data', 'fsdp'\)", out)


def test_run_file_with_unset_required_macros_and_a_mesh_override():
    # tiny_sft.gin leaves WORKDIR REQUIRED: a check needs no work directory.
    result = run_check("--gin_file=gin/experiments/tiny_sft.gin",
                       "--gin.MESH_SHAPE={'data': 1, 'fsdp': -1, 'tensor': 2}")
    assert result.returncode == 0, result.stderr
    assert mesh_sizes(result.stdout) == (1, 4, 2, 8)
    assert "WORKDIR" in result.stdout


def test_no_partitioner_and_errors():
    quickstart = run_check("--gin_file=gin/experiments/quickstart.gin")
    assert quickstart.returncode == 0, quickstart.stderr
    assert mesh_sizes(quickstart.stdout) == (1, 1, 1, 1)  # mesh/single.gin: one device
    convert = run_check("--gin_file=gin/runs/convert.gin")
    assert convert.returncode == 0, convert.stderr
    assert "binds no partitioning.Partitioner" in convert.stdout

    bad_mesh = run_check("--gin_file=gin/mesh/fsdp.gin", "--gin.MESH_SHAPE={'tensor': 3, "
                         "'fsdp': -1}")
    assert bad_mesh.returncode == 1
    assert "mesh error" in bad_mesh.stdout and "not divisible" in bad_mesh.stdout

    bad = os.path.join(REPO, "gin", "mesh", "fsdp.gin")
    broken = run_check(f"--gin_file={bad}", "--gin.no_such_thing.x=1")
    assert broken.returncode == 2
    assert "gin error" in broken.stderr and "no_such_thing" in broken.stderr
