"""`python -m xwin_jax.report WORKDIR` on a synthetic work directory: the stages that are there
(summary.json as a finished stage leaves it, metrics.jsonl by the loop's own MetricsWriter),
and nothing else."""

import json
import os
import subprocess
import sys

from xwin_jax import report
from xwin_jax.train.metrics import MetricsWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(stage_dir, steps, **series):
    """metrics.jsonl (and tensorboard/) as the loop writes them: SERIES maps a metric to a
    function of the step."""
    writer = MetricsWriter(str(stage_dir), steps, progress=False)
    for step in range(1, steps + 1):
        writer.write(step, {k: f(step) for k, f in series.items()})
    writer.close()


def write_summary(stage_dir, summary):
    """STAGE_DIR/summary.json, which a stage writes when it finishes."""
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def training_summary(steps, loss, **extra):
    """The keys train/loop.py's summary has (plus the stage's wall time)."""
    return dict({"steps": steps, "resumed_from_step": None, "final_train_loss": loss,
                 "final_metrics": {"loss": loss}, "final_eval": {}, "tokens_seen": 100 * steps,
                 "train_time_s": 2.0, "tokens_per_s": 50.0 * steps, "wall_time_s": 3.0}, **extra)


def synthetic_workdir(root):
    """sft and reward finished, eval/sft done, ppo stopped midway (metrics, no summary);
    rejection and dpo never ran."""
    workdir = root / "run"
    log(workdir / "sft", 6, loss=lambda s: 2.0 / s, accuracy=lambda s: 0.1 * s)
    write_summary(str(workdir / "sft"), training_summary(6, 2.0 / 6))
    log(workdir / "reward", 4, loss=lambda s: 0.7 - 0.05 * s)
    write_summary(str(workdir / "reward"), training_summary(
        4, 0.5, final_eval={"accuracy": 0.8125, "margin": 0.5}))
    write_summary(str(workdir / "eval" / "sft"), {
        "policy": "sft", "judge_score": 4.25, "task_accuracy": 0.125, "win_rate_vs_sft": 50.0,
        "standard_error": 0.0, "length_controlled_winrate": 50.0, "rm_mean_reward": 0.5,
        "sft_judge_score_in_comparison": None, "wall_time_s": 1.0})
    log(workdir / "ppo", 3, loss=lambda s: -0.01 * s, score=lambda s: 0.2 * s,
        kl=lambda s: 0.1 * s, kl_k3=lambda s: 0.05 * s)
    write_summary(str(workdir / "data"), {"paths": {}, "wall_time_s": 0.1})
    return workdir


def test_the_report_names_the_stages_present_and_draws_their_plots(tmp_path, capsys):
    workdir = synthetic_workdir(tmp_path)
    assert report.find_stages(str(workdir)) == ["data", "sft", "reward", "ppo", "eval/sft"]

    assert report.main([str(workdir)]) == 0
    text = (workdir / "report.md").read_text()
    assert text.startswith("# Report: run\n")
    for row in ("| sft | 4.25 | 0.125 | 50.0 ± 0.0 | 50.0 | 0.50 | – | 3 |",
                "| reward | – | – | – | – | – | 0.812 | 3 |",
                "| sft | 6 | 0.3333 | – | 300 | 2 |",
                "| reward | 4 | 0.5000 | accuracy 0.8125, margin 0.5 | 200 | 2 |",
                "| ppo | 3 (unfinished) | -0.0300 | – | – | – |"):
        assert row in text, row
    for absent in ("| rejection |", "| dpo |", "PPO, last iteration"):
        assert absent not in text
    assert "Stages: data, sft, reward, ppo, eval/sft (not finished: ppo)." in text
    for plot in ("loss_curves.png", "ppo.png"):
        assert os.path.getsize(workdir / plot) > 1000
        assert f"]({plot})" in text
    assert f"report → {workdir / 'report.md'}" in capsys.readouterr().out


def test_only_training_stages_without_ppo_give_no_ppo_plot(tmp_path):
    workdir = tmp_path / "job"
    log(workdir / "sft", 3, loss=lambda s: 1.0 / s)
    write_summary(str(workdir / "sft"), training_summary(3, 1.0 / 3))
    assert report.main([str(workdir)]) == 0
    assert (workdir / "loss_curves.png").exists() and not (workdir / "ppo.png").exists()
    text = (workdir / "report.md").read_text()
    assert "| sft | – | – | – | – | – | – | 3 |" in text  # trained, not evaluated
    assert "![PPO]" not in text


def test_the_command_line(tmp_path):
    workdir = synthetic_workdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "xwin_jax.report", str(workdir)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| reward |" in done.stdout and (workdir / "report.md").exists()


def test_a_workdir_without_stages_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    for path, expected in ((tmp_path / "empty", "no stages found"),
                           (tmp_path / "missing", "no such directory")):
        done = subprocess.run([sys.executable, "-m", "xwin_jax.report", str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2
        assert done.stderr.startswith(f"error: {path}: {expected}")
        assert done.stderr.count("\n") == 1 and done.stdout == ""
    assert not (tmp_path / "empty" / "report.md").exists()


def test_a_stage_directory_passed_for_the_workdir_gets_a_hint(tmp_path, capsys):
    log(tmp_path / "sft", 2, loss=lambda s: 1.0)
    assert report.main([str(tmp_path / "sft")]) == 2
    assert "pass its parent" in capsys.readouterr().err
