"""The quickstart: the whole Xwin recipe, offline, on one work directory.

The stages are chained in gin/experiments/quickstart.gin as a list of (name, job) pairs; each
job is the one a user runs alone with gin/runs/*.gin (train_sft, annotate_job, train_reward,
train_rejection, train_ppo, train_dpo), bound in its own gin scope, plus the three steps only
the demo has, defined here:

    model      build the model, round-trip it through HF safetensors, decode a few tokens
    data       the synthetic suite (data/synthetic.py): SFT data, prompts, held-out prompts
    eval/*     a policy samples the held-out prompts; the judge rates each answer and
               compares it with SFT's (AlpacaEval style); the reward model scores both

`run` calls the jobs in order and writes WORKDIR/report.md (report.py) from their summaries.
Every job runs through the stage runner (train/stage.py): a rerun skips finished stages,
resumes a killed one, and refuses one whose settings or inputs changed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax import rewards, sampling
from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.evaluate import pairwise
from xwin_jax.fingerprint import file_identity
from xwin_jax.generate import ALPACA_EVAL_FILE, OUTPUTS_FILE, generate_job, load_outputs
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, init_params
from xwin_jax.models.spec import open_checkpoint
from xwin_jax.partitioning import Partitioner
from xwin_jax.report import CORRECTNESS_STAGE, write_report
from xwin_jax.train.stage import run_stage

DATA_STAGE, EVAL_DIR = "data", "eval"


def run(workdir: str, stages: Sequence[tuple[str, Callable[[], dict]]],
        title: str = "Quickstart report") -> dict:
    """Runs the (name, job) stages in order; returns {name: summary} and the report."""
    results: dict[str, Any] = {}
    for name, job in stages:
        results[name] = job()
    results["report"] = write_report(workdir, results, title=title)
    return results


def stage_file(workdir: str, name: str = "", stage: str = DATA_STAGE) -> str:
    """WORKDIR/<stage>/<name>: a file one stage writes and a later one reads (by default a
    data stage file, e.g. 'suite/sft_train.jsonl'); with no name, the stage directory."""
    return os.path.join(workdir, stage, name) if name else os.path.join(workdir, stage)


def model_stage(workdir: str, model: LlamaConfig, seed: int = 0,
                prompt: str = "USER: Hi! ASSISTANT:", num_tokens: int = 8) -> dict:
    """A random model through HF safetensors and back: logits must not change."""
    def body(stage_dir):
        params = init_params(model, jax.random.key(seed))
        print(f"[model] built {model.num_params() / 1e6:.2f}M-parameter Llama "
              f"({model.num_layers} layers, hidden {model.hidden_size}, {model.num_heads} "
              f"heads / {model.num_kv_heads} KV heads)")
        vocab = ByteVocabulary()
        save_params(os.path.join(stage_dir, "params"), model, params, vocabulary=vocab)
        hf_dir = os.path.join(stage_dir, "hf")
        hf.save_hf(model, params, hf_dir, dtype="float32", vocabulary=vocab)
        reimported_cfg, reimported = hf.load_hf(hf_dir, **model.runtime_fields())
        prompt_ids = [vocab.bos_id] + vocab.encode(prompt)
        tokens = jnp.asarray([prompt_ids])
        before = Llama(model).apply({"params": params}, tokens)
        after = Llama(reimported_cfg).apply({"params": reimported}, tokens)
        max_diff = float(jnp.abs(before - after).max())
        print(f"[model] HF safetensors round trip ({hf_dir}): config equal = "
              f"{reimported_cfg == model}, max |Δlogits| = {max_diff:.2e}")
        if reimported_cfg != model or max_diff > 1e-5:
            raise RuntimeError(f"HF round trip changed the model (max |Δlogits| = {max_diff})")
        generated = sampling.generate(reimported, reimported_cfg, [prompt_ids],
                                      [[1] * len(prompt_ids)], jax.random.key(seed),
                                      max_new_tokens=num_tokens).tokens[0].tolist()
        return {"num_params": model.num_params(), "hf_dir": hf_dir,
                "params_dir": os.path.join(stage_dir, "params"),
                "round_trip_max_abs_logit_diff": max_diff, "prompt": prompt,
                "greedy_token_ids": generated}

    settings = {"model": model, "seed": seed, "prompt": prompt, "num_tokens": num_tokens}
    return run_stage(os.path.join(workdir, "model"), "model", settings, body)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def annotate_prompt_records(single: list[dict], multiturn: list[dict], count: int,
                            multiturn_fraction: float) -> list[dict]:
    """`count` prompts for Xwin-Pair: round(count * multiturn_fraction) multi-turn prompts
    (a follow-up about an earlier answer: the judge sees the conversation, the reward model
    trains on the pairs) after the single-turn ones. The multi-turn prompts are those whose
    first question is not among the single-turn ones, so no question is asked twice."""
    wanted = min(count, round(count * multiturn_fraction))
    chosen = single[:count - wanted]
    asked = {r["prompt"] for r in chosen}
    fresh = [r for r in multiturn if r["prompt"][0]["content"] not in asked]
    return chosen + fresh[:wanted]


def data_stage(workdir: str, seed: int = 0, num_prompts: int = 3000,
               annotate_prompts: int = 1024, rejection_prompts: int = 512,
               eval_prompts: int = 384, annotate_multiturn_fraction: float = 0.125,
               families: Sequence[str] | None = None) -> dict:
    """The suite (of the named `families`; None: all), plus the prompt subsets the sampling
    stages and the evaluation read. The annotate prompts include a share of multi-turn ones
    (annotate_prompt_records); the rejection-sampling and held-out prompts are single-turn
    (AlpacaEval-style evaluation)."""
    synthetic.families_named(families)  # an unknown name fails now, naming the known ones

    def body(stage_dir):
        paths = synthetic.write_suite(os.path.join(stage_dir, "suite"), seed, num_prompts,
                                      families=families)
        # Held-out prompts: the test and valid splits (no policy or RM trains on either).
        held_out = _read_jsonl(paths["prompts_test"]) + _read_jsonl(paths["prompts_valid"])
        train = _read_jsonl(paths["prompts_train"])
        annotate = annotate_prompt_records(train, _read_jsonl(paths["prompts_multiturn_train"]),
                                           annotate_prompts, annotate_multiturn_fraction)
        for name, records in (("held_out_prompts", held_out[:eval_prompts]),
                              ("annotate_prompts", annotate),
                              ("rejection_prompts", train[:rejection_prompts])):
            paths[name] = os.path.join(stage_dir, f"{name}.jsonl")
            formats.write_jsonl(paths[name], records)
        multiturn = sum(isinstance(r["prompt"], list) for r in annotate)
        print(f"[data] synthetic suite → {stage_dir} ({min(eval_prompts, len(held_out))} "
              f"held-out prompts; {len(annotate)} annotate prompts, {multiturn} multi-turn)")
        return {"paths": paths, "annotate_multiturn_prompts": multiturn}

    settings = {"seed": seed, "num_prompts": num_prompts, "annotate_prompts": annotate_prompts,
                "rejection_prompts": rejection_prompts, "eval_prompts": eval_prompts,
                "annotate_multiturn_fraction": annotate_multiturn_fraction,
                "suite_version": synthetic.SUITE_VERSION}
    if families is not None:  # only when set: older finished stages stay valid
        settings["families"] = list(families)
    return run_stage(os.path.join(workdir, DATA_STAGE), DATA_STAGE, settings, body)


def judge_score(judge: Any, outputs: list[dict], annotations: list[dict] | None,
                side: str) -> float | None:
    """Mean 1-10 rating of a policy's held-out answers: the judge's own rating where it has
    one (the rule judge), else the ratings it gave in the pairwise comparisons with SFT."""
    if hasattr(judge, "rate"):
        return float(np.mean([judge.rate(o["instruction"], o["output"]) for o in outputs]))
    ratings = [a[f"rating_{side}"] for a in annotations or [] if a[f"rating_{side}"] is not None]
    return float(np.mean(ratings)) if ratings else None


def _verdicts(outputs: list[dict]) -> dict[str, list[bool]]:
    return synthetic.correct_by_family([o["instruction"] for o in outputs],
                                       [o["output"] for o in outputs])


def task_accuracy(outputs: list[dict]) -> float | None:
    """Share of answers the suite can verify that are correct (None for other prompts)."""
    verdicts = [v for family in _verdicts(outputs).values() for v in family]
    return float(np.mean(verdicts)) if verdicts else None


def task_accuracy_by_family(outputs: list[dict]) -> dict[str, float]:
    """{family: share of its answers that are correct}, for the families the suite knows."""
    return {family: float(np.mean(v)) for family, v in _verdicts(outputs).items()}


def evaluate_policy(workdir: str, name: str, model: LlamaConfig, judge: Any, *,
                    reference: str = "sft", reward_stage: str = "reward",
                    max_new_tokens: int = 96, temperature: float = 0.7, batch_size: int = 64,
                    reward_seq_len: int = 512, system: str | None = None, seed: int = 0,
                    partitioner: Partitioner | None = None) -> dict:
    """WORKDIR/eval/<name>: the policy WORKDIR/<name>/final answers the held-out prompts
    (outputs/), the judge compares them with the `reference` policy's (vs_<reference>/), and
    the summary holds the report's row. `system`: the chat template's system line the
    policies and the reward model were trained with (None: Xwin's)."""
    policy_dir = os.path.join(workdir, name, "final")
    reward_dir = os.path.join(workdir, reward_stage, "final")
    prompts = stage_file(workdir, "held_out_prompts.jsonl")
    reference_outputs = os.path.join(workdir, EVAL_DIR, reference, "outputs", ALPACA_EVAL_FILE)

    def body(stage_dir):
        outputs_dir = os.path.join(stage_dir, "outputs")
        generate_job(prompts, outputs_dir, model, ckpt_dir=policy_dir, generator=name,
                     batch_size=batch_size, max_new_tokens=max_new_tokens,
                     temperature=temperature, system=system, seed=seed,
                     partitioner=partitioner)
        outputs = load_outputs(outputs_dir)
        against = (os.path.join(outputs_dir, ALPACA_EVAL_FILE) if name == reference
                   else reference_outputs)
        compared = os.path.join(stage_dir, f"vs_{reference}")
        row = pairwise.evaluate_job(os.path.join(outputs_dir, ALPACA_EVAL_FILE), against,
                                    compared, judge, name=name, seed=seed,
                                    reward_dir=reward_dir, reward_seq_len=reward_seq_len,
                                    reward_system=system, model=model,
                                    partitioner=partitioner)
        with open(os.path.join(compared, pairwise.ANNOTATIONS_FILE)) as f:
            annotations = json.load(f)
        return {"policy": name, "policy_dir": policy_dir,
                "judge_score": judge_score(judge, outputs, annotations, "model"),
                "task_accuracy": task_accuracy(outputs),
                "finished_fraction": float(np.mean([o["finished"] for o in outputs])),
                "mean_length": float(np.mean([len(o["output"]) for o in outputs])),
                "win_rate_vs_sft": row["win_rate"], "standard_error": row["standard_error"],
                "length_controlled_winrate": row["length_controlled_winrate"],
                "rm_mean_reward": row.get("rm_mean_reward"),
                # SFT's answers as rated in these comparisons (a judge without its own rating)
                "sft_judge_score_in_comparison": row.get("mean_rating_reference")}

    settings = {"policy": open_checkpoint(policy_dir, model, what=f"{name} policy"),
                "reward": open_checkpoint(reward_dir, model, what="reward model"),
                "prompts": file_identity(prompts), "judge": judge,
                "reference": None if name == reference else file_identity(reference_outputs),
                "max_new_tokens": max_new_tokens, "temperature": temperature,
                "reward_seq_len": reward_seq_len, "seed": seed}
    if system is not None:  # only when set: older finished stages stay valid
        settings["system"] = system
    return run_stage(os.path.join(workdir, EVAL_DIR, name), f"{EVAL_DIR}/{name}", settings,
                     body)


def reward_accuracy_by_kind(scorer: rewards.RewardScorer, pairs: list[formats.PreferencePair],
                            vocab, seq_len: int, system: str | None = None) -> dict:
    """The reward model on every pair (chosen scored above rejected), overall and by
    synthetic.pair_kind."""
    chosen, rejected = (scorer.score_texts([p.prompt for p in pairs],
                                           [getattr(p, side) for p in pairs], vocab,
                                           seq_len=seq_len, system=system)
                        for side in ("chosen", "rejected"))
    correct = chosen > rejected
    kinds = np.asarray([synthetic.pair_kind(p.prompt, p.chosen, p.rejected)
                        for p in pairs])
    return {"accuracy": float(correct.mean()), "pairs": len(pairs),
            "by_kind": {kind: {"accuracy": float(correct[kinds == kind].mean()),
                               "pairs": int((kinds == kind).sum())}
                        for kind in synthetic.PAIR_KINDS if (kinds == kind).any()}}


def correctness_stage(workdir: str, model: LlamaConfig,
                      policies: Sequence[str] = ("sft", "rejection", "ppo", "dpo"), *,
                      reward_stage: str = "reward", seq_len: int = 512,
                      system: str | None = None,
                      partitioner: Partitioner | None = None) -> dict:
    """WORKDIR/eval/correctness: what the suite can check of the demo's models. The reward
    model's accuracy on every held-out pair of the suite (suite/pairs_valid.jsonl), by pair
    kind (correct vs wrong, length, unfinished: synthetic.pair_kind), and each evaluated
    policy's held-out task accuracy by family (from eval/<policy>/outputs). `system`: the
    chat template's system line the reward model was trained with (None: Xwin's)."""
    reward_dir = os.path.join(workdir, reward_stage, "final")
    pairs_path = stage_file(workdir, "suite/pairs_valid.jsonl")
    outputs = {name: os.path.join(workdir, EVAL_DIR, name, "outputs") for name in policies}

    def body(stage_dir):
        scorer = rewards.RewardScorer.load(reward_dir, model, partitioner)
        pairs = formats.read_pairs(pairs_path).records
        reward = reward_accuracy_by_kind(scorer, pairs, scorer.checkpoint.vocabulary, seq_len,
                                         system)
        kinds = ", ".join(f"{k} {v['accuracy']:.3f} ({v['pairs']})"
                          for k, v in reward["by_kind"].items())
        print(f"[{CORRECTNESS_STAGE}] reward model on {reward['pairs']} held-out pairs: "
              f"{reward['accuracy']:.3f} ({kinds})")
        tasks = {name: task_accuracy_by_family(load_outputs(path))
                 for name, path in outputs.items()}
        return {"reward_pairs": reward, "task_accuracy_by_family": tasks}

    settings = {"reward": open_checkpoint(reward_dir, model, what="reward model"),
                "pairs": file_identity(pairs_path), "seq_len": seq_len,
                "outputs": {name: file_identity(os.path.join(path, OUTPUTS_FILE))
                            for name, path in outputs.items()}}
    if system is not None:  # only when set: older finished stages stay valid
        settings["system"] = system
    return run_stage(os.path.join(workdir, CORRECTNESS_STAGE), CORRECTNESS_STAGE, settings,
                     body)
