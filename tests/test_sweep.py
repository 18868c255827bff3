"""launch/sweep.py: grid expansion and names, grid errors, the printed commands, failure
handling, collect's table, and one real local sweep of the tiny SFT (run, collect, rerun)."""

import csv
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(REPO, "launch", "sweep.py")
sys.path.insert(0, os.path.join(REPO, "launch"))
import sweep  # noqa: E402


def sweep_cli(*argv, env=None):
    return subprocess.run([sys.executable, SWEEP_PY, *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_grid_expansion_order_names_and_bindings():
    axes = sweep.parse_grids(["LEARNING_RATE=[1e-3, 3e-3]", "BATCH_SIZE=[4,8]"])
    runs = sweep.expand(axes)
    # The product in --grid order, the last axis fastest; the short column names.
    assert [run.name for run in runs] == [
        "LEARNING_RATE=0.001,BATCH_SIZE=4", "LEARNING_RATE=0.001,BATCH_SIZE=8",
        "LEARNING_RATE=0.003,BATCH_SIZE=4", "LEARNING_RATE=0.003,BATCH_SIZE=8"]
    assert runs[1].grid == {"LEARNING_RATE": 0.001, "BATCH_SIZE": 8}
    assert runs[1].bindings == (("LEARNING_RATE", "0.001"), ("BATCH_SIZE", "8"))
    assert [run.index for run in runs] == [0, 1, 2, 3]


def test_names_are_filesystem_safe_and_values_stay_gin_literals():
    axes = sweep.parse_grids(["a.opt=['adam', 'sgd w/m']", "b.opt=[[1, 2], None, True]"])
    runs = sweep.expand(axes)
    # Both axes end in `opt`, so the columns keep the full names.
    assert [run.name for run in runs] == [
        "a.opt=adam,b.opt=1+2", "a.opt=adam,b.opt=None", "a.opt=adam,b.opt=True",
        "a.opt=sgd_w_m,b.opt=1+2", "a.opt=sgd_w_m,b.opt=None", "a.opt=sgd_w_m,b.opt=True"]
    assert runs[3].bindings == (("a.opt", "'sgd w/m'"), ("b.opt", "[1, 2]"))
    long = sweep.expand(sweep.parse_grids([f"NAME=['{'x' * 300}']"]))[0].name
    assert len(long) == sweep.MAX_RUN_NAME and long.startswith("NAME=xxx")


@pytest.mark.parametrize("bad, message", [
    ("LR", "expected NAME=VALUE"),
    ("LR=", "expected NAME=VALUE"),
    ("9lr=[1]", "is not a gin name"),
    ("OPT=[adam, 'sgd']", "a bare word needs quotes"),
    ("LR=[1e-3, 3e-3", "cannot read"),
    ("LR=1e-3", "must be a list in brackets, e.g. LR=[1e-3]"),
    ("LR=[]", "empty"),
    ("LR=[1, 1]", "listed twice"),
    ("OPT=['a/b', 'a_b']", "'a_b'"),
])
def test_bad_grid_is_named(bad, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--gin_file=x.gin", "--grid", "BATCH_SIZE=[4]", "--grid", bad,
                    "--name=s", "--root=/tmp/s"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--grid {bad!r}" in err and message in err


def test_same_binding_twice_and_workdir_are_refused(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--gin_file=x.gin", "--grid", "LR=[1]", "--grid", "LR=[2]",
                    "--name=s", "--root=/tmp/s"])
    assert "--grid 'LR=[2]': LR is already swept" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--gin_file=x.gin", "--grid", "LR=[1]", "--set", "WORKDIR='/x'",
                    "--name=s", "--root=/tmp/s"])
    assert "WORKDIR is set by the sweep" in capsys.readouterr().err


def test_print_mode_commands(tmp_path):
    root = tmp_path / "sweeps"
    result = sweep_cli("--gin_file=gin/experiments/tiny_sft.gin",
                       "--grid", "LEARNING_RATE=[1e-3,3e-3]",
                       "--grid", "BATCH_SIZE=[4,8]", "--set", "TRAIN_STEPS=20",
                       "--name", "lr_bs", "--root", str(root), "--mode", "print")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 4
    assert commands[1] == [
        sys.executable, "-m", "xwin_jax.launch", "--gin_file=gin/experiments/tiny_sft.gin",
        "--gin.TRAIN_STEPS=20", "--gin.LEARNING_RATE=0.001",
        "--gin.BATCH_SIZE=8", f"--gin.WORKDIR='{root}/lr_bs/LEARNING_RATE=0.001,BATCH_SIZE=8'"]
    assert not root.exists()  # printing runs nothing and writes nothing


def test_tpu_mode_dry_run_one_slice_per_run():
    result = sweep_cli("--gin_file=gin/experiments/tiny_sft.gin", "--grid", "LR=[1, 2]",
                       "--name", "s", "--root", "/mnt/shared/sweeps", "--mode", "tpu",
                       "--tpu_prefix", "v5p", "--zone", "us-east5-a", "--dry_run")
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert commands == [
        [sys.executable, sweep.TPU_PY, "run", f"v5p-{i}", "--zone=us-east5-a",
         f"--run_name=LR={v}", "--", "--gin_file=gin/experiments/tiny_sft.gin",
         f"--gin.LR={v}", f"--gin.WORKDIR='/mnt/shared/sweeps/s/LR={v}'"]
        for i, v in enumerate([1, 2])]
    assert "--tpu_prefix" in sweep_cli("--gin_file=a.gin", "--grid", "LR=[1]", "--name=s",
                                       "--root=/r", "--mode=tpu").stderr


def write_summary(path, summary):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f)


def test_collect_flattens_prefixes_stages_and_reads_names(tmp_path):
    root = tmp_path / "sweeps"
    # Two stages per run → fields prefixed with the stage directory; no sweep_run.json →
    # grid values from the directory name.
    for lr, loss in [(0.001, 2.5), (0.003, 2.0)]:
        run = root / "s" / f"LR={lr},OPT=adam"
        write_summary(str(run / "sft" / "summary.json"),
                      {"steps": 3, "final_metrics": {"loss": loss, "hist": [1, 2]},
                       "tags": ["x"], "stage": "sft"})
        write_summary(str(run / "reward" / "summary.json"), {"accuracy": 0.5})
    (root / "s" / "LR=0.01,OPT=adam").mkdir()  # not finished: no row
    csv_path, md_path, markdown = sweep.collect(str(root), "s")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["LR=0.001,OPT=adam", "LR=0.003,OPT=adam"]
    assert list(rows[0]) == ["run", "LR", "OPT", "reward/accuracy", "sft/steps",
                             "sft/final_metrics.loss", "sft/stage"]
    assert rows[1]["LR"] == "0.003" and rows[1]["OPT"] == "adam"
    assert float(rows[1]["sft/final_metrics.loss"]) == 2.0
    assert markdown.splitlines()[0].startswith("| run | LR | OPT | reward/accuracy |")
    assert open(md_path).read() == markdown
    _, _, only_loss = sweep.collect(str(root), "s", metrics=["*.loss"])
    assert only_loss.splitlines()[0] == "| run | LR | OPT | sft/final_metrics.loss |"
    _, _, asked_order = sweep.collect(str(root), "s", metrics=["sft/s*", "reward/*"])
    assert asked_order.splitlines()[0] == (
        "| run | LR | OPT | sft/steps | sft/stage | reward/accuracy |")
    with pytest.raises(sweep.SweepError, match="no summary.json"):
        (root / "empty" / "run").mkdir(parents=True)
        sweep.collect(str(root), "empty")


def fake_python(tmp_path):
    """An 'interpreter' for local runs: fails the LR=2 run, 'trains' the others by writing a
    summary, and counts its calls."""
    script = tmp_path / "fake_python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import ast, json, os, sys\n"
        f"open({str(tmp_path / 'calls')!r}, 'a').write('x')\n"
        "workdir = ast.literal_eval(sys.argv[-1].split('=', 1)[1])\n"
        "if '--gin.LR=2' in sys.argv: sys.exit(3)\n"
        "os.makedirs(workdir + '/sft', exist_ok=True)\n"
        "json.dump({'final_train_loss': 1.5}, open(workdir + '/sft/summary.json', 'w'))\n")
    script.chmod(0o755)
    return str(script)


def test_failed_run_is_reported_the_sweep_goes_on_and_reruns_retry_it(tmp_path):
    args = ["--gin_file=x.gin", "--grid", "LR=[1, 2, 3]", "--name", "s",
            "--root", str(tmp_path / "sweeps"), "--mode", "local",
            "--python", fake_python(tmp_path)]
    first = sweep_cli(*args)
    assert first.returncode == 1
    assert "run 2/3: LR=2: FAILED (exit 3); continuing" in first.stdout
    assert "run 3/3: LR=3" in first.stdout
    assert "3 runs, 2 finished, 0 skipped, 1 failed: LR=2" in first.stdout
    second = sweep_cli(*args)
    assert second.returncode == 1
    assert "run 1/3: LR=1: already finished, skipped" in second.stdout
    assert "2 skipped, 1 failed" in second.stdout
    assert (tmp_path / "calls").read_text() == "x" * 4  # 3 runs, then only the failed one


def test_local_sweep_of_the_tiny_sft_collect_and_rerun(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device: the fake-device mesh only slows this down
    root, data = tmp_path / "sweeps", tmp_path / "data"
    args = ["--gin_file=gin/experiments/tiny_sft.gin",
            "--grid", "LEARNING_RATE=[1e-3, 3e-3]",
            "--set", "TRAIN_STEPS=3", "--set", "sft.train_sft.eval_every=0",
            "--set", "sft.train_sft.checkpoint_every=3", "--set", "sft.train_sft.eval_batches=1",
            "--set", "SEQ_LEN=256", "--set", "BATCH_SIZE=4", "--set", f"DATA_DIR={str(data)!r}",
            "--name", "lr", "--root", str(root), "--mode", "local"]
    first = sweep_cli(*args, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "run 1/2: LEARNING_RATE=0.001" in first.stdout
    assert "run 2/2: LEARNING_RATE=0.003" in first.stdout

    collected = sweep_cli("collect", "--root", str(root), "--name", "lr")
    assert collected.returncode == 0, collected.stderr
    with open(root / "lr" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["run"], float(row["LEARNING_RATE"])) for row in rows] == [
        ("LEARNING_RATE=0.001", 0.001), ("LEARNING_RATE=0.003", 0.003)]
    for row in rows:
        assert int(row["steps"]) == 3
        assert 0 < float(row["final_train_loss"]) < 20
        assert float(row["final_metrics.loss"]) == float(row["final_train_loss"])
    assert collected.stdout.startswith("| run | LEARNING_RATE | steps |")
    assert len(collected.stdout.splitlines()) == 4  # header, rule, two runs

    summary = root / "lr" / "LEARNING_RATE=0.001" / "sft" / "summary.json"
    mtime = summary.stat().st_mtime_ns
    started = time.monotonic()
    again = sweep_cli(*args, env=env)
    assert again.returncode == 0
    assert "2 runs, 0 finished, 2 skipped, 0 failed" in again.stdout
    assert time.monotonic() - started < 10  # no job was started
    assert summary.stat().st_mtime_ns == mtime

    changed = [arg.replace("TRAIN_STEPS=3", "TRAIN_STEPS=4") for arg in args]
    refused = sweep_cli(*changed, env=env)
    assert refused.returncode == 1
    assert "holds results of a different command" in refused.stdout
    assert summary.stat().st_mtime_ns == mtime
