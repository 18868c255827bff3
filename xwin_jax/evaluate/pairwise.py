"""AlpacaEval-compatible evaluation: model outputs against reference outputs, judged pairwise.

    python -m xwin_jax.launch --gin_file=gin/runs/evaluate.gin \
        --gin.MODEL_OUTPUTS="'/runs/x/generate/alpaca_eval.json'" \
        --gin.REFERENCE_OUTPUTS="'alpaca_eval_gpt4_baseline.json'" --gin.OUTPUT_DIR="'/runs/x/eval'"

Both files are AlpacaEval JSON lists (or JSONL) of {"instruction", "output", "generator",
"dataset"}, matched by instruction. The judge (annotate/judge.py: OpenAIJudge or RuleJudge) sees
the two outputs in an order drawn from a hash of (seed, instruction), so position bias cancels
over the set and a rerun asks the same questions; verdicts are cached (a killed run resumes
without paying twice). Identical outputs are draws without a judge call.

Writes to OUTPUT_DIR:

- annotations.json: one record per instruction, AlpacaEval's `preference` encoding (1 =
  reference wins, 2 = model wins, 1.5 = draw). An *unjudged* instruction (the judge's replies
  held no usable verdict, asked twice) has `"preference": null` — what alpaca_eval writes for
  an annotation it could not parse, and drops from its win rate — and a `reason` starting
  "unjudged:". It is not cached, so a rerun asks again for it only.
- unjudged.jsonl: the unjudged instructions (index, instruction excerpt, problem, an excerpt of
  the last reply), rewritten each run.
- leaderboard.csv: the generator's row, AlpacaEval's columns first and unchanged, then
  `n_unjudged`, with a reward model `rm_mean_reward`, `rm_mean_reward_reference`,
  `rm_win_rate`, and `length_controlled_variant`: which length-controlled win rate
  `length_controlled_winrate` is — "alpaca_eval_2.0" (AlpacaEval 2.0's GLM, exactly, with
  `instruction_difficulty` = its df_gamed.csv), "alpaca_eval_2.0_noreg" (the same GLM
  without the gamed baselines, from its instruction_difficulty.csv) or "length_only" (no
  difficulty file: the length part of the GLM only; evaluate/winrate.py).
- summary.json: this run's row (win rate, SE, LC, counts, n_unjudged, judge, mean ratings, the
  RM columns) and the paths of the files above.

OUTPUT_DIR is a stage (train/stage.py): its fingerprint is the contents of both outputs
files, the judge (its fingerprint(): model, sampling settings, prompt — not its key or
endpoint), the row's name, the seed, the reward model and the difficulty file (when
given). A rerun of a finished evaluation skips it; one that changed any of these is refused
naming it (one evaluation per directory).

Unjudged instructions are left out of the win rate (and of n_total) and reported in
`n_unjudged` and in a printed line; a rerun of the same command asks the judge again for
those only (the finished stage is reopened). If none of the instructions sent to the judge
could be judged, the job stops with a UserError (after writing annotations.json and
unjudged.jsonl). With a reward model (`reward_dir`: rewards.RewardScorer, the outputs
tokenized with the vocabulary it records), also the mean normalised reward of both sides and
the RM's win rate.

On N hosts (`--multihost`) the judging happens once, on host 0 (it alone calls the judge and
appends to the cache; annotate/pairs.py: on_host_zero, via OUTPUT_DIR/host0_result.json);
every host then builds the same row from those annotations, every host takes part in the
reward model's scoring (each gives the whole batch), and host 0 alone writes the files.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from xwin_jax import fingerprint
from xwin_jax.annotate.pairs import HOST_ZERO_FILE, UNJUDGED_FILE, excerpt, judge_pairs, \
    on_host_zero, unjudged_line, write_unjudged
from xwin_jax.data import formats
from xwin_jax.data.formats import DataFormatError
from xwin_jax.data.vocabulary import resolve_vocabulary
from xwin_jax.errors import UserError
from xwin_jax.evaluate.winrate import LEADERBOARD_COLUMNS, VARIANT_LENGTH_ONLY, \
    InstructionDifficulty, leaderboard_row, read_instruction_difficulty
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import open_checkpoint
from xwin_jax.partitioning import Partitioner
from xwin_jax.rewards import RewardScorer, RewardStats
from xwin_jax.train.stage import run_stage, write_json

ANNOTATIONS_FILE = "annotations.json"
LEADERBOARD_FILE = "leaderboard.csv"
CACHE_FILE = "judge_cache.jsonl"
RM_COLUMNS = ("rm_mean_reward", "rm_mean_reward_reference", "rm_win_rate")
# After AlpacaEval's columns, which stay first and unchanged.
EXTRA_COLUMNS = ("n_unjudged", *RM_COLUMNS, "length_controlled_variant")


def read_outputs(path: str) -> list[dict]:
    """An AlpacaEval outputs file (JSON list or JSONL), read by data.formats: a malformed
    record is a DataFormatError naming file:line and the field."""
    return formats.read_outputs(path).records


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
        raise DataFormatError(f"{len(missing)} model instruction(s) have no reference output, "
                              f"e.g. {missing[0][:80]!r}")
    return [(m, references[m["instruction"]]) for m in model_outputs]


def judge_outputs(matched: Sequence[tuple[dict, dict]], judge: Any, cache_path: str, *,
                  seed: int = 0, concurrency: int = 8) -> tuple[list[dict], list[dict]]:
    """One annotation per matched pair (identical outputs are draws, not judged; unjudged
    ones have preference None), and a record per unjudged instruction."""
    to_judge = [i for i, (m, r) in enumerate(matched) if m["output"] != r["output"]]
    judged = judge_pairs(
        [(matched[i][0]["instruction"], matched[i][1]["output"], matched[i][0]["output"])
         for i in to_judge], judge, cache_path, concurrency,
        swaps=[swapped_order(matched[i][0]["instruction"], seed) for i in to_judge])
    by_index = dict(zip(to_judge, judged.verdicts))
    problems = {to_judge[r["index"]]: r["problem"] for r in judged.unjudged}
    unjudged = [{"index": to_judge[r["index"]],
                 "instruction": excerpt(matched[to_judge[r["index"]]][0]["instruction"]),
                 "model_first": r["swapped"], "key": r["key"], "problem": r["problem"],
                 "replies": r["replies"], "reply": r["reply"]} for r in judged.unjudged]
    annotations = []
    for i, (model, reference) in enumerate(matched):
        verdict = by_index.get(i)
        if i in by_index and verdict is None:
            preference, reason = None, f"unjudged: {problems.get(i, 'no usable verdict')}"
        elif verdict is None:
            preference, reason = 1.5, "identical outputs"
        else:
            preference, reason = preference_from_verdict(verdict), verdict.get("reason", "")
        annotations.append({
            "instruction": model["instruction"],
            "output_1": reference["output"], "generator_1": reference.get("generator", ""),
            "output_2": model["output"], "generator_2": model.get("generator", ""),
            "preference": preference,
            "model_first": swapped_order(model["instruction"], seed),
            "rating_reference": None if verdict is None else verdict.get("rating_a"),
            "rating_model": None if verdict is None else verdict.get("rating_b"),
            "reason": reason})
    return annotations, unjudged


def reward_model_scores(scorer: RewardScorer, matched: Sequence[tuple[dict, dict]], vocab,
                        seq_len: int = 1024, batch_size: int = 16,
                        system: str | None = None) -> dict:
    """The RM's normalised reward of both sides and its win rate for the model (`system`: the
    chat template's system line, as in rewards.RewardScorer.score_texts)."""
    instructions = [m["instruction"] for m, _ in matched]
    # Both sides in one call: one compilation of the scoring function.
    rewards = scorer.score_texts(instructions * 2, [m["output"] for m, _ in matched]
                                 + [r["output"] for _, r in matched], vocab, seq_len=seq_len,
                                 batch_size=batch_size, system=system)
    model_rewards, reference_rewards = np.split(rewards, 2)
    wins = np.where(model_rewards > reference_rewards, 1.0,
                    np.where(model_rewards < reference_rewards, 0.0, 0.5))
    return {"rm_mean_reward": float(model_rewards.mean()),
            "rm_mean_reward_reference": float(reference_rewards.mean()),
            "rm_win_rate": 100.0 * float(wins.mean())}


def update_leaderboard(path: str, name: str, row: dict) -> None:
    """Adds (or replaces) one generator's row of the leaderboard CSV: AlpacaEval's columns,
    then EXTRA_COLUMNS (empty where a row has no value, e.g. no reward model). Host 0
    writes it."""
    if jax.process_index() != 0:
        return
    columns = ["", *LEADERBOARD_COLUMNS, *EXTRA_COLUMNS]
    rows = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = {r[""]: r for r in csv.DictReader(f)}
    rows[name] = {"": name, **{k: row[k] for k in columns[1:] if row.get(k) is not None}}
    ordered = sorted(rows.values(), key=lambda r: -float(r["win_rate"]))
    with open(path + ".partial", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(ordered)
    os.replace(path + ".partial", path)


def _json_safe(value: Any) -> Any:
    """NaN (e.g. the SE of one instruction) → None: summary.json stays strict JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate_job(model_outputs: str, reference_outputs: str, output_dir: str, judge: Any, *,
                 name: str | None = None, seed: int = 0, concurrency: int = 8,
                 reward_dir: str | None = None, vocabulary: Any = None,
                 reward_seq_len: int = 1024, reward_batch_size: int = 32,
                 reward_system: str | None = None, model: LlamaConfig | None = None,
                 partitioner: Partitioner | None = None,
                 instruction_difficulty: str | None = None) -> dict:
    """Judges MODEL_OUTPUTS against REFERENCE_OUTPUTS into OUTPUT_DIR, the 'evaluate' stage
    (train/stage.py: its fingerprint is both files' contents, the judge, the row's name, the
    seed, the reward model and the difficulty file); writes annotations.json,
    unjudged.jsonl, leaderboard.csv and summary.json. Returns the summary: the row
    (AlpacaEval's columns, n_unjudged, judge, mean ratings, the RM columns when reward_dir
    is set, length_controlled_variant) and the files' paths. With
    `reward_dir`, the outputs are also scored by that reward model, tokenized with the
    vocabulary it records unless `vocabulary` says otherwise, with the chat template's system
    line `reward_system` (None: Xwin's) as the reward model was trained; `model` sets its
    numerics. With `instruction_difficulty` (AlpacaEval's df_gamed.csv, or its
    instruction_difficulty.csv), the LC is AlpacaEval 2.0's GLM; an instruction's index in
    that file is its position in REFERENCE_OUTPUTS, as in alpaca_eval (a DataFormatError
    before any judging names the instructions the file lacks)."""
    model_records = read_outputs(model_outputs)
    if not model_records:
        raise DataFormatError(f"{model_outputs}: no outputs to evaluate")
    reference_records = read_outputs(reference_outputs)
    matched = match_outputs(model_records, reference_records)
    difficulty = indices = None
    if instruction_difficulty:  # checked now, before the judge is paid
        difficulty = read_instruction_difficulty(instruction_difficulty)
        position = {r["instruction"]: i for i, r in enumerate(reference_records)}
        indices = [position[m["instruction"]] for m, _ in matched]
        difficulty.for_instructions(indices)
    name = name or model_records[0].get("generator") or "model"
    reward = None
    if reward_dir:
        checkpoint = open_checkpoint(reward_dir, model, what="REWARD_DIR")
        reward = {"checkpoint": checkpoint, "stats": RewardStats.load(reward_dir),
                  "vocabulary": resolve_vocabulary(vocabulary, checkpoint.vocabulary,
                                                   checkpoint.config.vocab_size,
                                                   checkpoint.path),
                  "seq_len": reward_seq_len}
        if reward_system is not None:  # only when set: older finished stages stay valid
            reward["system"] = reward_system
    settings = {"model_outputs": fingerprint.file_identity(model_outputs),
                "reference_outputs": fingerprint.file_identity(reference_outputs),
                "judge": judge, "name": name, "seed": seed, "reward_model": reward}
    if difficulty is not None:  # only when set: older finished stages stay valid
        settings["instruction_difficulty"] = fingerprint.file_identity(instruction_difficulty)

    def score() -> dict:  # loaded once the verdicts are in
        scorer = RewardScorer.load(reward_dir, model, partitioner or Partitioner())
        divisor = scorer.partitioner.batch_divisor  # the batch is sharded over (data, fsdp)
        return reward_model_scores(scorer, matched, reward["vocabulary"], reward_seq_len,
                                   -(-reward_batch_size // divisor) * divisor, reward_system)

    def body(stage_dir: str) -> dict:
        # The judge is asked once (host 0 on N hosts); the scoring in _report runs everywhere.
        annotations, unjudged = on_host_zero(
            os.path.join(stage_dir, HOST_ZERO_FILE),
            lambda: judge_outputs(matched, judge, os.path.join(stage_dir, CACHE_FILE),
                                  seed=seed, concurrency=concurrency))
        return _report(stage_dir, name, matched, annotations, unjudged, judge,
                       score if reward else None, difficulty, indices)

    return run_stage(output_dir, "evaluate", settings, body)


def _report(stage_dir: str, name: str, matched: Sequence[tuple[dict, dict]],
            annotations: list[dict], unjudged: list[dict], judge: Any,
            score: Callable[[], dict] | None,
            difficulty: InstructionDifficulty | None = None,
            indices: list[int] | None = None) -> dict:
    """The evaluate stage's files from its annotations (and `score`: the reward model's
    columns); returns its summary. Run on every host (the scoring is collective); host 0
    writes and prints."""
    annotations_path = os.path.join(stage_dir, ANNOTATIONS_FILE)
    unjudged_path = os.path.join(stage_dir, UNJUDGED_FILE)
    write_json(annotations_path, annotations)
    write_unjudged(unjudged_path, unjudged)
    preferences = [a["preference"] for a in annotations]
    asked = [p for (m, r), p in zip(matched, preferences) if m["output"] != r["output"]]
    if asked and all(p is None for p in asked):  # the rest are identical outputs (draws)
        raise UserError(
            f"no instruction could be judged: the judge's replies for all {len(asked)} "
            f"instructions it was asked about held no usable verdict (see {unjudged_path})",
            hint="read the replies there: the judge must answer with the JSON verdict the "
                 "prompt asks for; the same command asks again for these only")
    row = leaderboard_row(preferences, [len(m["output"]) for m, _ in matched],
                          [len(r["output"]) for _, r in matched], difficulty, indices)
    row["judge"] = judge.model
    ratings = [a["rating_model"] for a in annotations if a["rating_model"] is not None]
    if ratings:
        row["mean_rating_model"] = float(np.mean(ratings))
        row["mean_rating_reference"] = float(np.mean(
            [a["rating_reference"] for a in annotations if a["rating_reference"] is not None]))
    if score:
        row.update(score())
    leaderboard_path = os.path.join(stage_dir, LEADERBOARD_FILE)
    update_leaderboard(leaderboard_path, name, row)
    if jax.process_index() == 0:
        _print_row(name, row, stage_dir, unjudged_path, bool(score))
    summary = {"generator": name, **{k: _json_safe(v) for k, v in row.items()},
               "annotations_file": annotations_path, "leaderboard_file": leaderboard_path,
               "unjudged_file": unjudged_path}
    if difficulty is not None:
        summary["instruction_difficulty_file"] = difficulty.path
    if row["n_unjudged"]:  # the same command asks the judge again, for these only
        summary["incomplete"] = f"{row['n_unjudged']} instructions unjudged"
    return summary


def _print_row(name: str, row: dict, stage_dir: str, unjudged_path: str, scored: bool
               ) -> None:
    variant = row["length_controlled_variant"]
    lc = f"LC {row['length_controlled_winrate']:.1f}" + (
        "" if variant == VARIANT_LENGTH_ONLY else f", {variant}")
    print(f"[evaluate] {name}: win rate {row['win_rate']:.1f} ± {row['standard_error']:.1f} "
          f"({lc}) over {row['n_total']} instruction"
          f"{'' if row['n_total'] == 1 else 's'} → {stage_dir}")
    if scored:
        print(f"[evaluate] reward model: mean reward {row['rm_mean_reward']:.3f} (reference "
              f"{row['rm_mean_reward_reference']:.3f}), RM win rate {row['rm_win_rate']:.1f}")
    if row["n_unjudged"]:  # instructions, duplicates included (unjudged.jsonl: one a pair)
        print(unjudged_line("evaluate", row["n_unjudged"], "instruction", unjudged_path))
