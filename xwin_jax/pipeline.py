"""The quickstart: the whole Xwin recipe, offline, on one work directory.

    model      build the model, round-trip it through HF safetensors, decode a few tokens
    data       the synthetic suite (data/synthetic.py): SFT data, prompts, held-out prompts
    sft        supervised fine-tuning
    xwin_pair  sample responses from the SFT policy, judge pairs → preference pairs
    reward     a reward model on the suite's pairs plus Xwin-Pair (trunk from SFT), accuracy
               on held-out pairs
    rejection  best-of-n with the RM, then SFT on the winners
    ppo        PPO against the RM (value from the RM, reference = SFT)
    dpo        DPO on Xwin-Pair (reference = SFT)
    eval/*     every policy samples the held-out prompts; the judge rates each answer and
               compares it with SFT's (AlpacaEval style); the RM scores both
    report     WORKDIR/report.md, plots, and the table printed at the end

Each stage writes WORKDIR/<stage>/summary.json when it finishes; a rerun skips finished stages
and a killed training stage resumes from its checkpoint. The judge is the synthetic suite's rule
judge unless gin binds another (e.g. annotate.judge.OpenAIJudge).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax import sampling
from xwin_jax.annotate.judge import RuleJudge
from xwin_jax.annotate.pairs import annotate_job
from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic
from xwin_jax.data.pairs_data import PairsData
from xwin_jax.data.prompts_data import PromptsData
from xwin_jax.data.sft_data import SftData
from xwin_jax.evaluate import pairwise
from xwin_jax.generate import ALPACA_EVAL_FILE, generate_job, load_outputs
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import Llama, init_params
from xwin_jax.partitioning import Partitioner
from xwin_jax.report import write_report
from xwin_jax.train import dpo, ppo, rejection, reward, sft
from xwin_jax.train.loop import finished_summary, write_summary

BYTE_OFFSET = 3  # ids 0-2 are pad, BOS, EOS; byte b is id b + 3
POLICIES = ("sft", "rejection", "ppo", "dpo")


def model_stage(stage_dir: str, model: LlamaConfig, seed: int, prompt: str,
                num_tokens: int) -> dict:
    params = init_params(model, jax.random.key(seed))
    print(f"[model] built {model.num_params() / 1e6:.2f}M-parameter Llama "
          f"({model.num_layers} layers, hidden {model.hidden_size}, {model.num_heads} heads / "
          f"{model.num_kv_heads} KV heads)")
    ckpt_dir = os.path.join(stage_dir, "params")
    save_params(ckpt_dir, model, params)
    hf_dir = os.path.join(stage_dir, "hf")
    hf.save_hf(model, params, hf_dir, dtype="float32")
    reimported_cfg, reimported = hf.load_hf(hf_dir, **model.runtime_fields())
    prompt_ids = [1] + [b + BYTE_OFFSET for b in prompt.encode()]
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
    return {"num_params": model.num_params(), "hf_dir": hf_dir, "params_dir": ckpt_dir,
            "round_trip_max_abs_logit_diff": max_diff, "prompt": prompt,
            "greedy_token_ids": generated}


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_subset(source: str, path: str, count: int | None) -> str:
    records = _read_jsonl(source)
    formats.write_jsonl(path, records[:count] if count else records)
    return path


def data_stage(stage_dir: str, seed: int, num_prompts: int, annotate_prompts: int,
               rejection_prompts: int, eval_prompts: int) -> dict:
    paths = synthetic.write_suite(os.path.join(stage_dir, "suite"), seed, num_prompts)
    # Held-out prompts: the test and valid splits (no policy or RM trains on either).
    held_out = os.path.join(stage_dir, "held_out_prompts.jsonl")
    records = _read_jsonl(paths["prompts_test"]) + _read_jsonl(paths["prompts_valid"])
    formats.write_jsonl(held_out, records[:eval_prompts])
    paths.update(
        held_out=held_out,
        annotate=_write_subset(paths["prompts_train"],
                               os.path.join(stage_dir, "annotate_prompts.jsonl"),
                               annotate_prompts),
        rejection=_write_subset(paths["prompts_train"],
                                os.path.join(stage_dir, "rejection_prompts.jsonl"),
                                rejection_prompts))
    print(f"[data] synthetic suite → {stage_dir} ({min(eval_prompts, len(records))} held-out "
          f"prompts)")
    return {"paths": paths}


def judge_score(judge: Any, outputs: list[dict], annotations: list[dict] | None,
                side: str) -> float | None:
    """Mean 1-10 rating of a policy's held-out answers: the judge's own rating where it has
    one (the rule judge), else the ratings it gave in the pairwise comparisons with SFT."""
    if hasattr(judge, "rate"):
        return float(np.mean([judge.rate(o["instruction"], o["output"]) for o in outputs]))
    ratings = [a[f"rating_{side}"] for a in annotations or [] if a[f"rating_{side}"] is not None]
    return float(np.mean(ratings)) if ratings else None


def task_accuracy(outputs: list[dict]) -> float | None:
    """Share of answers the suite can verify that are correct (None for other prompts)."""
    rule = synthetic.RuleJudge()
    verdicts = [rule.rate(o["instruction"], o["output"]).correct for o in outputs
                if synthetic.solve(o["instruction"]) is not None]
    return float(np.mean(verdicts)) if verdicts else None


def eval_stage(stage_dir: str, name: str, policy_dir: str, sft_eval_dir: str | None,
               prompts_path: str, model: LlamaConfig, judge: Any, reward_dir: str, *,
               max_new_tokens: int, temperature: float, batch_size: int, seed: int,
               reward_seq_len: int) -> dict:
    """Samples the held-out prompts from one policy and scores the answers."""
    outputs_dir = os.path.join(stage_dir, "outputs")
    generate_job(prompts_path, outputs_dir, model, ckpt_dir=policy_dir, generator=name,
                 batch_size=batch_size, max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed)
    outputs = load_outputs(outputs_dir)
    reference = os.path.join(sft_eval_dir or stage_dir, "outputs", ALPACA_EVAL_FILE)
    row = pairwise.evaluate_job(os.path.join(outputs_dir, ALPACA_EVAL_FILE), reference,
                                os.path.join(stage_dir, "vs_sft"), judge, name=name, seed=seed,
                                reward_dir=reward_dir, reward_seq_len=reward_seq_len)
    with open(os.path.join(stage_dir, "vs_sft", pairwise.ANNOTATIONS_FILE)) as f:
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


def _run_stage(workdir: str, name: str, stage: Callable[[str], dict]) -> dict:
    """Runs a stage that does not keep its own summary, unless it already finished."""
    stage_dir = os.path.join(workdir, name)
    done = finished_summary(stage_dir, name)
    if done is not None:
        return done
    os.makedirs(stage_dir, exist_ok=True)
    start = time.perf_counter()
    summary = stage(stage_dir)
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    path = write_summary(stage_dir, summary)
    print(f"[{name}] done in {summary['wall_time_s']} s → {path}")
    return summary


def run(workdir: str, model: LlamaConfig, judge: Any = None, *, seed: int = 0,
        partitioner: Partitioner | None = None, prompt: str = "USER: Hi! ASSISTANT:",
        num_tokens: int = 8, num_prompts: int = 3000, seq_len: int = 512,
        max_new_tokens: int = 96, temperature: float = 0.7, generate_batch_size: int = 64,
        sft_steps: int = 600, sft_batch_size: int = 8, sft_learning_rate: float = 3e-3,
        annotate_prompts: int = 1024, annotate_responses: int = 4,
        reward_steps: int = 200, reward_batch_size: int = 16,
        reward_learning_rate: float = 3e-4,
        rejection_prompts: int = 512, rejection_samples: int = 8, rejection_steps: int = 100,
        rejection_learning_rate: float = 3e-4,
        ppo_iterations: int = 20, ppo_batch_size: int = 64, ppo_learning_rate: float = 1e-4,
        ppo_value_learning_rate: float = 1e-3, ppo_kl_coef: float = 0.2,
        ppo_config: ppo.PPOConfig | None = None,
        dpo_steps: int = 100, dpo_batch_size: int = 16, dpo_learning_rate: float = 3e-5,
        dpo_beta: float = 0.1, dpo_sft_weight: float = 1.0, eval_prompts: int = 512) -> dict:
    """Runs the stages in order (see the module docstring); returns {stage: summary}."""
    judge = judge if judge is not None else RuleJudge()
    partitioner = partitioner or Partitioner({"data": 1, "fsdp": 1, "tensor": 1})
    results: dict[str, Any] = {}
    results["model"] = _run_stage(workdir, "model", lambda d: model_stage(
        d, model, seed, prompt, num_tokens))
    results["data"] = _run_stage(workdir, "data", lambda d: data_stage(
        d, seed, num_prompts, annotate_prompts, rejection_prompts, eval_prompts))
    paths = results["data"]["paths"]
    final = lambda stage: os.path.join(workdir, stage, "final")  # noqa: E731

    results["sft"] = sft.train_sft(
        workdir, model, sft_steps, SftData([paths["sft_train"]], seq_len, sft_batch_size,
                                           seed=seed),
        partitioner=partitioner, learning_rate=sft_learning_rate,
        warmup_steps=min(20, sft_steps // 10), checkpoint_every=max(sft_steps // 4, 1),
        seed=seed)
    results["xwin_pair"] = _run_stage(workdir, "xwin_pair", lambda d: annotate_job(
        paths["annotate"], d, model, judge, ckpt_dir=final("sft"),
        num_responses=annotate_responses, temperature=temperature,
        max_new_tokens=max_new_tokens, batch_size=generate_batch_size, seed=seed))
    pairs_file = results["xwin_pair"]["pairs_file"]
    results["reward"] = reward.train_reward(
        workdir, model, reward_steps,
        PairsData([paths["pairs_train"], pairs_file], seq_len, reward_batch_size, seed=seed),
        eval_data=PairsData([paths["pairs_valid"]], seq_len, reward_batch_size, seed=seed),
        partitioner=partitioner, learning_rate=reward_learning_rate,
        warmup_steps=min(20, reward_steps // 10), eval_batches=8, stats_batches=8,
        checkpoint_every=max(reward_steps // 2, 1), init_params_dir=final("sft"), seed=seed)
    results["rejection"] = rejection.train_rejection(
        workdir, model, rejection_steps, paths["rejection"], policy_dir=final("sft"),
        reward_dir=final("reward"), num_samples=rejection_samples,
        sample_batch_size=generate_batch_size, max_new_tokens=max_new_tokens,
        temperature=temperature, max_prompt_len=seq_len // 2, batch_size=sft_batch_size,
        seq_len=seq_len, seed=seed, partitioner=partitioner,
        learning_rate=rejection_learning_rate, checkpoint_every=max(rejection_steps // 2, 1))
    config = ppo_config or ppo.PPOConfig(max_new_tokens=max_new_tokens,
                                         temperature=temperature, kl_coef=ppo_kl_coef,
                                         epochs=2, num_minibatches=2)
    results["ppo"] = ppo.train_ppo(
        workdir, model, ppo_iterations,
        PromptsData([paths["prompts_train"]], seq_len // 2, ppo_batch_size, seed=seed),
        policy_dir=final("sft"), reward_dir=final("reward"), partitioner=partitioner,
        ppo=config, learning_rate=ppo_learning_rate,
        value_learning_rate=ppo_value_learning_rate,
        checkpoint_every=max(ppo_iterations // 4, 1), seed=seed)
    results["dpo"] = dpo.train_dpo(
        workdir, model, dpo_steps, PairsData([pairs_file], seq_len, dpo_batch_size, seed=seed),
        partitioner=partitioner, beta=dpo_beta, sft_weight=dpo_sft_weight,
        learning_rate=dpo_learning_rate,
        warmup_steps=min(10, dpo_steps // 10), checkpoint_every=max(dpo_steps // 2, 1),
        init_params_dir=final("sft"), seed=seed)

    sft_eval_dir = os.path.join(workdir, "eval", "sft")
    for name in POLICIES:
        results[f"eval/{name}"] = _run_stage(workdir, f"eval/{name}", lambda d, n=name: (
            eval_stage(d, n, final(n), None if n == "sft" else sft_eval_dir, paths["held_out"],
                       model, judge, final("reward"), max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=generate_batch_size, seed=seed,
                       reward_seq_len=seq_len)))
    results["report"] = write_report(workdir, results)
    return results
