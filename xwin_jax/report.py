"""The report of a work directory: one row per stage, loss curves and PPO's score and KL.

    WORKDIR/report.md, WORKDIR/loss_curves.png, WORKDIR/ppo.png

The quickstart (pipeline.py) writes it at the end; for any other WORKDIR (one job's, a
stopped run's, a finished quickstart's):

    python -m xwin_jax.report WORKDIR

reads every WORKDIR/<stage>/summary.json (and WORKDIR/eval/<policy>/summary.json) and the
stages' metrics.jsonl files, and reports the stages that are there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TRAINING_STAGES = ("sft", "reward", "rejection", "ppo", "dpo")
# The quickstart's stages in the order it runs them; other stage directories follow, sorted.
PIPELINE_STAGES = ("model", "data", "sft", "xwin_pair", "reward", "rejection", "ppo", "dpo")
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"  # train/loop.py's: written when a stage finishes
METRICS_FILE = "metrics.jsonl"  # train/metrics.py's: one record per logged step
EVAL_DIR = "eval"
# pipeline.correctness_stage's: the reward model by pair kind, the policies by task family
CORRECTNESS_STAGE = f"{EVAL_DIR}/correctness"


def read_records(stage_dir: str) -> list[dict]:
    """The records of a stage's metrics.jsonl ([] without one); a line cut off by a kill is
    skipped."""
    path = os.path.join(stage_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def read_metrics(stage_dir: str, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the given metrics from a stage's metrics.jsonl."""
    series = {k: [] for k in keys}
    for record in read_records(stage_dir):
        for key in keys:
            if key in record:
                series[key].append((record["step"], record[key]))
    return series


def _is_stage(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, name))
               for name in (SUMMARY_FILE, METRICS_FILE))


def find_stages(workdir: str) -> list[str]:
    """The stages WORKDIR holds: subdirectories with a summary.json or a metrics.jsonl, and
    eval/<policy>; the quickstart's first, in its order."""
    found = []
    for entry in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
        path = os.path.join(workdir, entry)
        if not os.path.isdir(path):
            continue
        if entry == EVAL_DIR and not _is_stage(path):
            found += [f"{EVAL_DIR}/{policy}" for policy in sorted(os.listdir(path))
                      if _is_stage(os.path.join(path, policy))]
        elif _is_stage(path):
            found.append(entry)
    order = list(PIPELINE_STAGES) + [f"{EVAL_DIR}/{name}" for name in TRAINING_STAGES]
    return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))


def load_results(workdir: str, stages: list[str]) -> dict:
    """{stage: its summary.json} for the stages given; {"unfinished": True} for one that has
    logged metrics but not finished yet (running, or stopped)."""
    results = {}
    for stage in stages:
        path = os.path.join(workdir, stage, SUMMARY_FILE)
        if os.path.exists(path):
            with open(path) as f:
                results[stage] = json.load(f)
        else:
            results[stage] = {"unfinished": True}
    return results


def _fmt(value, pattern="{:.2f}") -> str:
    return "–" if value is None else pattern.format(value)


def _training_stages(results: dict) -> list[str]:
    """The training stages the results hold: the quickstart's, in order, then any other with a
    training summary (steps) or an eval/<stage> row."""
    names = [n for n in TRAINING_STAGES if n in results or f"{EVAL_DIR}/{n}" in results]
    for key, value in results.items():
        if key == CORRECTNESS_STAGE:
            continue
        name = key[len(EVAL_DIR) + 1:] if key.startswith(f"{EVAL_DIR}/") else key
        trained = isinstance(value, dict) and ("steps" in value or value.get("unfinished"))
        if name not in names and (key != name or trained):
            names.append(name)
    return names


def stage_label(name: str, summary: dict | None) -> str:
    """The row's name: the stage, and for DPO the pairs it trained on (Xwin-Set pairs carry
    their rejected-answer rule)."""
    rule = ((summary or {}).get("train_data") or {}).get("rejected_rule")
    return f"{name} (Xwin-Set, rejected: {rule})" if rule else name


def table(results: dict) -> str:
    """The Markdown table of the stages (those in the results; the rest are left out)."""
    lines = ["| stage | judge score (1-10) | task accuracy | win rate vs SFT | LC win rate | "
             "RM reward | RM accuracy | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    sft_in_comparisons = [results[f"eval/{n}"].get("sft_judge_score_in_comparison")
                          for n in ("rejection", "ppo", "dpo") if f"eval/{n}" in results]
    sft_in_comparisons = [v for v in sft_in_comparisons if v is not None]
    for name in _training_stages(results):
        train = results.get(name) or {}
        row = results.get(f"eval/{name}") or None
        if (name == "sft" and row and row.get("judge_score") is None
                and sft_in_comparisons):
            # A judge that only compares: SFT's ratings from the other stages' comparisons.
            row = dict(row, judge_score=sum(sft_in_comparisons) / len(sft_in_comparisons))
        wall = train.get("wall_time_s")
        if row is None:  # not evaluated; the reward model: its held-out pair accuracy
            accuracy = reward_accuracy(results) if name == "reward" else None
            lines.append(f"| {stage_label(name, train)} | – | – | – | – | – | "
                         f"{_fmt(accuracy, '{:.3f}')} | "
                         f"{_fmt(wall, '{:.0f}')} |")
            continue
        win = "–" if row.get("win_rate_vs_sft") is None else (
            f"{row['win_rate_vs_sft']:.1f} ± {row.get('standard_error') or 0.0:.1f}")
        lines.append(
            f"| {stage_label(name, train)} | {_fmt(row.get('judge_score'))} | "
            f"{_fmt(row.get('task_accuracy'), '{:.3f}')} | {win} | "
            f"{_fmt(row.get('length_controlled_winrate'), '{:.1f}')} | "
            f"{_fmt(row.get('rm_mean_reward'))} | – | {_fmt(wall, '{:.0f}')} |")
    return "\n".join(lines)


def reward_accuracy(results: dict) -> float | None:
    """The reward model's held-out pair accuracy: on every held-out pair where the
    correctness stage ran, else on the reward job's eval batches."""
    every = ((results.get(CORRECTNESS_STAGE) or {}).get("reward_pairs") or {}).get("accuracy")
    return every if every is not None else \
        ((results.get("reward") or {}).get("final_eval") or {}).get("accuracy")


def correctness_tables(results: dict) -> list[str]:
    """The correctness stage's two tables (none without it): the reward model's held-out
    pair accuracy by pair kind, and each policy's held-out task accuracy by family."""
    summary = results.get(CORRECTNESS_STAGE) or {}
    lines = []
    reward = summary.get("reward_pairs")
    if reward:
        kinds = list(reward["by_kind"])
        lines += ["Reward model, held-out pairs of the suite by kind (accuracy, pairs):", "",
                  "| all | " + " | ".join(k.replace("_", " ") for k in kinds) + " |",
                  "|---" * (len(kinds) + 1) + "|",
                  f"| {reward['accuracy']:.3f} ({reward['pairs']}) | " + " | ".join(
                      f"{reward['by_kind'][k]['accuracy']:.3f} ({reward['by_kind'][k]['pairs']})"
                      for k in kinds) + " |", ""]
    tasks = summary.get("task_accuracy_by_family")
    if tasks:
        families = sorted({f for by_family in tasks.values() for f in by_family})
        lines += ["Held-out task accuracy by family:", "",
                  "| policy | " + " | ".join(f.replace("_", " ") for f in families) + " |",
                  "|---" * (len(families) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_fmt(by_family.get(f)) for f in families)
                  + " |" for name, by_family in tasks.items()]
        lines.append("")
    return lines


def _fmt_metrics(metrics: dict) -> str:
    shown = [(k, v) for k, v in (metrics or {}).items()
             if k in ("loss", "accuracy", "margin") and isinstance(v, (int, float))]
    return ", ".join(f"{k} {v:.4g}" for k, v in shown) or "–"


def training_table(workdir: str, results: dict) -> str:
    """Steps, last train loss, final eval, throughput of every training stage; a stage that
    has not finished (no summary.json yet) shows its last logged step."""
    lines = ["| stage | steps | train loss | eval | tokens/s | train time (s) |",
             "|---|---|---|---|---|---|"]
    for name in _training_stages(results):
        summary = results.get(name) or {}
        records = read_records(os.path.join(workdir, name))
        if not summary and not records:
            continue
        if "steps" in summary:
            steps = str(summary["steps"])
            loss = summary.get("final_train_loss")
        else:  # still running, or stopped before its end
            train = [r for r in records if "train/loss" in r]
            steps = f"{records[-1]['step']} (unfinished)" if records else "–"
            loss = train[-1]["train/loss"] if train else None
        lines.append(
            f"| {name} | {steps} | {_fmt(loss, '{:.4f}')} | "
            f"{_fmt_metrics(summary.get('final_eval'))} | "
            f"{_fmt(summary.get('tokens_per_s'), '{:.0f}')} | "
            f"{_fmt(summary.get('train_time_s'), '{:.0f}')} |")
    return "\n".join(lines)


def plot(workdir: str, stages: list[str] | None = None) -> list[str]:
    """loss_curves.png (one panel per training stage with a logged loss; default: the
    quickstart's training stages, or those WORKDIR holds) and ppo.png (score and KL per
    iteration, where a PPO stage logged them). Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if stages is None:
        present = find_stages(workdir)
        stages = [s for s in present if s in TRAINING_STAGES] + [
            s for s in present if s not in TRAINING_STAGES and not s.startswith(f"{EVAL_DIR}/")]
    curves = {}
    for stage in stages:
        series = read_metrics(os.path.join(workdir, stage), ("train/loss", "eval/loss"))
        if series["train/loss"]:
            curves[stage] = series
    written = []
    if curves:
        figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
        for axis, (stage, series) in zip(axes[0], curves.items()):
            axis.plot(*zip(*series["train/loss"]), label="train")
            if series["eval/loss"]:
                axis.plot(*zip(*series["eval/loss"]), "o-", label="eval")
                axis.legend()
            axis.set_title(stage)
            axis.set_xlabel("iteration" if stage == "ppo" else "step")
        axes[0][0].set_ylabel("training loss")
        figure.tight_layout()
        path = os.path.join(workdir, "loss_curves.png")
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    series = read_metrics(os.path.join(workdir, "ppo"), ("train/score", "train/kl",
                                                         "train/kl_k3"))
    if any(series.values()):
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


def write_report(workdir: str, results: dict, title: str = "Quickstart report") -> dict:
    """Writes WORKDIR/report.md and the plots for the stages in `results` ({stage: summary},
    as the pipeline returns or load_results reads); prints the table; returns what it
    wrote."""
    rows = table(results)
    plots = plot(workdir, _training_stages(results))
    text = [
        f"# {title}", "",
        "Held-out prompts, one sample each at the sampling temperature. Judge score: the "
        "judge's mean 1-10 rating of the answers. Task accuracy: answers the synthetic suite "
        "verifies as correct. Win rate vs SFT: AlpacaEval-style pairwise judging against the "
        "SFT policy's answers (50 = a tie). RM reward: the reward model's mean normalised "
        "score. RM accuracy: held-out preference pairs (all of them where the correctness "
        "stage ran, else the reward job's eval batches).", "", rows, ""]
    if (results.get("ppo") or {}).get("final_metrics"):
        ppo = results["ppo"]["final_metrics"]
        share = (f", rollout share of the iteration time {ppo['rollout_fraction']:.0%}"
                 if "rollout_fraction" in ppo else "")  # logged with time_phases=True
        text += [
            f"PPO, last iteration: KL (k1) {ppo.get('kl', float('nan')):.3f}, KL (k3) "
            f"{ppo.get('kl_k3', float('nan')):.3f}{share}.", ""]
    pairs = ((results.get("dpo") or {}).get("train_data") or {})
    if pairs.get("rejected_rule"):
        skipped = ", ".join(f"{n} {why}" for why, n in pairs["prompts_skipped"].items() if n)
        text += [f"DPO on Xwin-Set: {pairs['pairs']} pairs from rejection sampling's samples "
                 f"(chosen: the best finished response; rejected: {pairs['rejected_rule']}"
                 + (f"; prompts skipped: {skipped}" if skipped else "") + ").", ""]
    correctness = correctness_tables(results)
    if correctness:
        text += ["## Correctness", ""] + correctness
    training = training_table(workdir, results)
    if training.count("\n") > 1:  # a row below the header
        text += ["## Training", "", training, ""]
    stages = [s for s in results if isinstance(results[s], dict)]
    unfinished = [s for s in stages if results[s].get("unfinished")]
    text += [f"Stages: {', '.join(stages)}"
             + (f" (not finished: {', '.join(unfinished)})" if unfinished else "") + ".", ""]
    for path in plots:
        name = os.path.basename(path)
        label = "loss curves" if name == "loss_curves.png" else "PPO"
        text += [f"![{label}]({name})", ""]
    path = os.path.join(workdir, REPORT_FILE)
    with open(path, "w") as f:
        f.write("\n".join(text))
    print("\n" + rows + f"\n\nreport → {path}")
    return {"report": path, "plots": plots, "table": rows}


def main(argv: list[str] | None = None) -> int:
    """python -m xwin_jax.report WORKDIR: report.md and the plots for the stages there."""
    parser = argparse.ArgumentParser(
        prog="python -m xwin_jax.report",
        description="Writes WORKDIR/report.md, loss_curves.png and ppo.png for the stages "
                    "WORKDIR holds (each <stage>/summary.json and metrics.jsonl, and "
                    "eval/<policy>/summary.json); missing stages are left out.")
    parser.add_argument("workdir", metavar="WORKDIR", help="a job's or the quickstart's "
                        "output directory (e.g. workdir/quickstart)")
    parser.add_argument("--title", default=None, help="the report's heading (default: "
                        "'Report: <WORKDIR name>')")
    args = parser.parse_args(argv)
    workdir = args.workdir
    if not os.path.isdir(workdir):
        print(f"error: {workdir}: no such directory", file=sys.stderr)
        return 2
    stages = find_stages(workdir)
    if not stages:
        hint = (f"; {workdir} is itself a stage directory: pass its parent"
                if _is_stage(workdir) else "")
        print(f"error: {workdir}: no stages found (no <stage>/{SUMMARY_FILE} or "
              f"<stage>/{METRICS_FILE}){hint}", file=sys.stderr)
        return 2
    title = args.title or f"Report: {os.path.basename(os.path.abspath(workdir))}"
    write_report(workdir, load_results(workdir, stages), title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
