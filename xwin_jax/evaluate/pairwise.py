"""AlpacaEval-compatible evaluation: model outputs against reference outputs, judged pairwise.

    python -m xwin_jax.launch --gin_file=gin/runs/evaluate.gin \
        --gin.MODEL_OUTPUTS="'/runs/x/generate/alpaca_eval.json'" \
        --gin.REFERENCE_OUTPUTS="'alpaca_eval_gpt4_baseline.json'" --gin.OUTPUT_DIR="'/runs/x/eval'"

Both files are AlpacaEval JSON lists of {"instruction", "output", "generator", "dataset"},
matched by instruction. The judge (annotate/judge.py: OpenAIJudge or RuleJudge) sees the two
outputs in an order drawn from a hash of (seed, instruction), so position bias cancels over the
set and a rerun asks the same questions; verdicts are cached (a killed run resumes without
paying twice). Identical outputs are draws without a judge call.

Writes OUTPUT_DIR/annotations.json (one record per instruction, AlpacaEval's `preference`
encoding: 1 = reference wins, 2 = model wins, 1.5 = draw) and OUTPUT_DIR/leaderboard.csv (a row
per generator, AlpacaEval's columns). With a reward model, also the mean normalised reward of
both sides and the RM's win rate.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from xwin_jax.annotate.pairs import judge_pairs
from xwin_jax.evaluate.winrate import LEADERBOARD_COLUMNS, leaderboard_row

ANNOTATIONS_FILE = "annotations.json"
LEADERBOARD_FILE = "leaderboard.csv"
CACHE_FILE = "judge_cache.jsonl"
REQUIRED_FIELDS = ("instruction", "output")


def read_outputs(path: str) -> list[dict]:
    """An AlpacaEval outputs file (JSON list, or JSONL); errors name the file and record."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON or JSONL ({err})") from err
    for i, record in enumerate(records):
        missing = [k for k in REQUIRED_FIELDS if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {i} lacks string field(s) {missing}")
    return records


def swapped_order(instruction: str, seed: int = 0) -> bool:
    """Whether the judge sees the model's output first, from a hash of (seed, instruction)."""
    digest = hashlib.sha256(f"{seed}\x00{instruction}".encode()).hexdigest()
    return int(digest[:8], 16) % 2 == 1


def preference_from_verdict(verdict: dict) -> float:
    """A verdict on (A = reference, B = model) → 1 (reference wins), 2 (model) or 1.5."""
    return {"A": 1.0, "B": 2.0}.get(verdict["better"], 1.5)


def match_outputs(model_outputs: Sequence[dict], reference_outputs: Sequence[dict]
                  ) -> list[tuple[dict, dict]]:
    """(model, reference) records with the same instruction, in the model file's order."""
    references = {r["instruction"]: r for r in reference_outputs}
    missing = [m["instruction"] for m in model_outputs if m["instruction"] not in references]
    if missing:
        raise ValueError(f"{len(missing)} model instruction(s) have no reference output, e.g. "
                         f"{missing[0][:80]!r}")
    return [(m, references[m["instruction"]]) for m in model_outputs]


def judge_outputs(matched: Sequence[tuple[dict, dict]], judge: Any, cache_path: str, *,
                  seed: int = 0, concurrency: int = 8) -> list[dict]:
    """One annotation per matched pair (identical outputs are draws, not judged)."""
    to_judge = [i for i, (m, r) in enumerate(matched) if m["output"] != r["output"]]
    verdicts = judge_pairs(
        [(matched[i][0]["instruction"], matched[i][1]["output"], matched[i][0]["output"])
         for i in to_judge], judge, cache_path, concurrency,
        swaps=[swapped_order(matched[i][0]["instruction"], seed) for i in to_judge])
    by_index = dict(zip(to_judge, verdicts))
    annotations = []
    for i, (model, reference) in enumerate(matched):
        verdict = by_index.get(i)
        annotations.append({
            "instruction": model["instruction"],
            "output_1": reference["output"], "generator_1": reference.get("generator", ""),
            "output_2": model["output"], "generator_2": model.get("generator", ""),
            "preference": 1.5 if verdict is None else preference_from_verdict(verdict),
            "model_first": swapped_order(model["instruction"], seed),
            "rating_reference": None if verdict is None else verdict.get("rating_a"),
            "rating_model": None if verdict is None else verdict.get("rating_b"),
            "reason": "identical outputs" if verdict is None else verdict.get("reason", "")})
    return annotations


def reward_model_scores(reward_dir: str, matched: Sequence[tuple[dict, dict]],
                        vocabulary: str = "bytes", seq_len: int = 1024, batch_size: int = 16
                        ) -> dict:
    """The RM's normalised reward of both sides and its win rate for the model."""
    from xwin_jax.checkpoints.params import load_params
    from xwin_jax.train.reward import score_responses
    from xwin_jax.train.rollout import load_reward_stats

    cfg, params = load_params(reward_dir, to_host=True)
    settings = dict(vocabulary=vocabulary, seq_len=seq_len, batch_size=batch_size,
                    stats=load_reward_stats(reward_dir))
    instructions = [m["instruction"] for m, _ in matched]
    # Both sides in one call: one compilation of the scoring function.
    rewards = score_responses(cfg, params, instructions * 2,
                              [m["output"] for m, _ in matched]
                              + [r["output"] for _, r in matched], **settings)
    model_rewards, reference_rewards = np.split(rewards, 2)
    wins = np.where(model_rewards > reference_rewards, 1.0,
                    np.where(model_rewards < reference_rewards, 0.0, 0.5))
    return {"rm_mean_reward": float(model_rewards.mean()),
            "rm_mean_reward_reference": float(reference_rewards.mean()),
            "rm_win_rate": 100.0 * float(wins.mean())}


def update_leaderboard(path: str, name: str, row: dict) -> None:
    """Adds (or replaces) one generator's row of the leaderboard CSV."""
    rows = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = {r[""]: r for r in csv.DictReader(f)}
    rows[name] = {"": name, **{k: row[k] for k in LEADERBOARD_COLUMNS}}
    ordered = sorted(rows.values(), key=lambda r: -float(r["win_rate"]))
    with open(path + ".partial", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["", *LEADERBOARD_COLUMNS])
        writer.writeheader()
        writer.writerows(ordered)
    os.replace(path + ".partial", path)


def evaluate_job(model_outputs: str, reference_outputs: str, output_dir: str, judge: Any, *,
                 name: str | None = None, seed: int = 0, concurrency: int = 8,
                 reward_dir: str | None = None, vocabulary: str = "bytes",
                 reward_seq_len: int = 1024, reward_batch_size: int = 32) -> dict:
    """Judges MODEL_OUTPUTS against REFERENCE_OUTPUTS; writes annotations and the leaderboard
    row; returns the row (plus RM numbers when reward_dir is set)."""
    os.makedirs(output_dir, exist_ok=True)
    model_records = read_outputs(model_outputs)
    matched = match_outputs(model_records, read_outputs(reference_outputs))
    name = name or (model_records[0].get("generator") if model_records else None) or "model"
    annotations = judge_outputs(matched, judge, os.path.join(output_dir, CACHE_FILE),
                                seed=seed, concurrency=concurrency)
    with open(os.path.join(output_dir, ANNOTATIONS_FILE), "w", encoding="utf-8") as f:
        json.dump(annotations, f, ensure_ascii=False, indent=2)
    row = leaderboard_row([a["preference"] for a in annotations],
                          [len(m["output"]) for m, _ in matched],
                          [len(r["output"]) for _, r in matched])
    update_leaderboard(os.path.join(output_dir, LEADERBOARD_FILE), name, row)
    ratings = [a["rating_model"] for a in annotations if a["rating_model"] is not None]
    row["judge"] = judge.model
    if ratings:
        row["mean_rating_model"] = float(np.mean(ratings))
        row["mean_rating_reference"] = float(np.mean(
            [a["rating_reference"] for a in annotations if a["rating_reference"] is not None]))
    if reward_dir:
        row.update(reward_model_scores(reward_dir, matched, vocabulary, reward_seq_len,
                                       reward_batch_size))
    print(f"[evaluate] {name}: win rate {row['win_rate']:.1f} ± {row['standard_error']:.1f} "
          f"(LC {row['length_controlled_winrate']:.1f}) over {row['n_total']} instructions "
          f"→ {output_dir}")
    return row
