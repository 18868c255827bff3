"""The quickstart's report: one row per stage, loss curves and PPO's score and KL.

    WORKDIR/report.md, WORKDIR/loss_curves.png, WORKDIR/ppo.png
"""

from __future__ import annotations

import json
import os

TRAINING_STAGES = ("sft", "reward", "rejection", "ppo", "dpo")
REPORT_FILE = "report.md"


def read_metrics(stage_dir: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the given metrics from a stage's metrics.jsonl."""
    series = {k: [] for k in keys}
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return series
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            for key in keys:
                if key in record:
                    series[key].append((record["step"], record[key]))
    return series


def _fmt(value, pattern="{:.2f}") -> str:
    return "–" if value is None else pattern.format(value)


def table(results: dict) -> str:
    """The Markdown table of the stages."""
    lines = ["| stage | judge score (1-10) | task accuracy | win rate vs SFT | LC win rate | "
             "RM reward | RM accuracy | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    sft_in_comparisons = [results[f"eval/{n}"].get("sft_judge_score_in_comparison")
                          for n in ("rejection", "ppo", "dpo") if f"eval/{n}" in results]
    sft_in_comparisons = [v for v in sft_in_comparisons if v is not None]
    for name in TRAINING_STAGES:
        train = results.get(name, {})
        row = results.get(f"eval/{name}")
        if name == "sft" and row and row["judge_score"] is None and sft_in_comparisons:
            # A judge that only compares: SFT's ratings from the other stages' comparisons.
            row = dict(row, judge_score=sum(sft_in_comparisons) / len(sft_in_comparisons))
        wall = train.get("wall_time_s")
        if row is None:  # the reward model: its held-out pair accuracy
            accuracy = (train.get("final_eval") or {}).get("accuracy")
            lines.append(f"| {name} | – | – | – | – | – | {_fmt(accuracy, '{:.3f}')} | "
                         f"{_fmt(wall, '{:.0f}')} |")
            continue
        win = f"{row['win_rate_vs_sft']:.1f} ± {row['standard_error']:.1f}"
        lines.append(
            f"| {name} | {_fmt(row['judge_score'])} | {_fmt(row['task_accuracy'], '{:.3f}')} | "
            f"{win} | {_fmt(row['length_controlled_winrate'], '{:.1f}')} | "
            f"{_fmt(row['rm_mean_reward'])} | – | {_fmt(wall, '{:.0f}')} |")
    return "\n".join(lines)


def plot(workdir: str) -> list[str]:
    """loss_curves.png (every training stage) and ppo.png (score and KL per iteration)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axes = plt.subplots(1, len(TRAINING_STAGES), figsize=(4 * len(TRAINING_STAGES), 3))
    for axis, stage in zip(axes, TRAINING_STAGES):
        series = read_metrics(os.path.join(workdir, stage), ("train/loss",))["train/loss"]
        if series:
            axis.plot(*zip(*series))
        axis.set_title(stage)
        axis.set_xlabel("iteration" if stage == "ppo" else "step")
    axes[0].set_ylabel("training loss")
    figure.tight_layout()
    path = os.path.join(workdir, "loss_curves.png")
    figure.savefig(path, dpi=80)
    plt.close(figure)
    written.append(path)
    series = read_metrics(os.path.join(workdir, "ppo"), ("train/score", "train/kl",
                                                         "train/kl_k3"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    if series["train/score"]:
        left.plot(*zip(*series["train/score"]))
    left.set_title("PPO: reward-model score")
    for key, label in (("train/kl", "KL (k1)"), ("train/kl_k3", "KL (k3)")):
        if series[key]:
            right.plot(*zip(*series[key]), label=label)
    right.set_title("PPO: KL to the reference")
    right.legend()
    for axis in (left, right):
        axis.set_xlabel("iteration")
    figure.tight_layout()
    path = os.path.join(workdir, "ppo.png")
    figure.savefig(path, dpi=80)
    plt.close(figure)
    written.append(path)
    return written


def write_report(workdir: str, results: dict) -> dict:
    """Writes WORKDIR/report.md and the plots; prints the table; returns what it wrote."""
    rows = table(results)
    plots = plot(workdir)
    ppo = results.get("ppo", {}).get("final_metrics", {})
    text = [
        "# Quickstart report", "",
        "Held-out prompts, one sample each at the sampling temperature. Judge score: the "
        "judge's mean 1-10 rating of the answers. Task accuracy: answers the synthetic suite "
        "verifies as correct. Win rate vs SFT: AlpacaEval-style pairwise judging against the "
        "SFT policy's answers (50 = a tie). RM reward: the reward model's mean normalised "
        "score. RM accuracy: held-out preference pairs.", "", rows, "",
        f"PPO, last iteration: KL (k1) {ppo.get('kl', float('nan')):.3f}, KL (k3) "
        f"{ppo.get('kl_k3', float('nan')):.3f}, rollout share of the iteration time "
        f"{ppo.get('rollout_fraction', float('nan')):.0%}.", "",
        "![loss curves](loss_curves.png)", "", "![PPO](ppo.png)", ""]
    path = os.path.join(workdir, REPORT_FILE)
    with open(path, "w") as f:
        f.write("\n".join(text))
    print("\n" + rows + f"\n\nreport → {path}")
    return {"report": path, "plots": plots, "table": rows}
