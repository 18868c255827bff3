"""Rejection sampling (best-of-n, Xwin-Set): sample n responses per prompt from the policy,
score them with the reward model, keep the best (optionally only above a threshold), write the
winners as SFT data, and fine-tune the policy on them (sft.fit).

Two stages (stage.run_stage), so that changing only the fine-tune keeps the expensive samples:

    WORKDIR/<samples_stage>/        (default xwin_set) the samples, a stage of its own: its
      samples.jsonl                 fingerprint is the prompts file, the policy and reward
                                    models, n and the sampling settings; every prompt's n
                                    responses and normalised scores, appended per prompt
                                    group (a killed run resumes there)
      best_of_n.jsonl               the winners under this run's threshold, ShareGPT (what
                                    SftData reads), chosen anew from samples.jsonl every run
    WORKDIR/<stage>/                (default rejection) the fine-tune on the winners; its
      final/                        fingerprint holds the samples' and the threshold

Responses that never emit EOS are never chosen. n may be as large as 64 (the Xwin-Set
setting); rows are generated in fixed-shape batches, so one program serves every group, and
each (prompt, sample) has its own PRNG key, so batching and resume do not change the samples.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from xwin_jax import fingerprint, sampling
from xwin_jax.data import converters, formats
from xwin_jax.data.sft_data import SftData
from xwin_jax.errors import ConfigError
from xwin_jax.generate import read_done
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM, check_context
from xwin_jax.partitioning import Partitioner
from xwin_jax.rewards import RewardScorer, open_reward
from xwin_jax.train import rollout
from xwin_jax.train.sft import fit
from xwin_jax.train.sharded import Start, frozen_params
from xwin_jax.train.stage import run_stage
from xwin_jax.train.state import OptimizerConfig

SAMPLES_FILE = "samples.jsonl"
BEST_FILE = "best_of_n.jsonl"


def best_index(scores: np.ndarray, finished: np.ndarray, threshold: float | None) -> int | None:
    """The highest-scoring finished response, or None when none is finished or the best is
    below the threshold."""
    eligible = np.where(finished, scores, -np.inf)
    best = int(np.argmax(eligible))
    if not np.isfinite(eligible[best]) or (threshold is not None and eligible[best] < threshold):
        return None
    return best


def sample_and_score(params: Any, cfg: LlamaConfig, score_fn: Callable, ids: list[list[int]],
                     keys: jax.Array, *, width: int, batch_size: int, vocab,
                     **sampling_kwargs) -> list[dict]:
    """One sample per row of `ids` (left-padded to `width`, in fixed batches of batch_size
    rows) → [{"text", "score", "finished", "num_tokens"}] in row order. `score_fn(tokens,
    mask)` scores host rows (RewardScorer.score_tokens)."""
    results = []
    for start in range(0, len(ids), batch_size):
        chunk = list(range(start, min(start + batch_size, len(ids))))
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        batch = converters.left_padded_batch([ids[i] for i in rows], width, vocab.pad_id)
        generation = sampling.generate(params, cfg, batch["tokens"], batch["mask"],
                                       keys[np.asarray(rows)],
                                       stop_ids=(vocab.eos_id,), pad_id=vocab.pad_id,
                                       **sampling_kwargs)
        assembled = rollout.assemble(batch["tokens"], batch["mask"], generation)
        scores = np.asarray(score_fn(assembled["tokens"], assembled["mask"]))
        texts = generation.texts(vocab)
        for r in range(len(chunk)):
            results.append({"text": texts[r], "score": float(scores[r]),
                            "finished": bool(generation.finished[r]),
                            "num_tokens": int(generation.lengths[r])})
    return results


def sample_prompts(stage_dir: str, prompts: list[formats.Prompt], policy: Start,
                   reward_dir: str, model: LlamaConfig, *, partitioner: Partitioner,
                   num_samples: int, batch_size: int, max_new_tokens: int, temperature: float,
                   top_k: int, top_p: float, max_prompt_len: int, system: str | None,
                   seed: int) -> dict:
    """The samples stage's body: samples and scores every prompt not yet in
    STAGE_DIR/samples.jsonl (n per prompt, keys by (prompt, sample)); returns statistics of
    all of them."""
    from tqdm import tqdm

    if jax.process_count() > 1:
        raise ConfigError("rejection sampling runs on one host for now (one writer of "
                          "samples.jsonl)", hint="run one process and shard over its local "
                                                 "devices")
    vocab = policy.vocabulary
    samples_path = os.path.join(stage_dir, SAMPLES_FILE)
    done = read_done(samples_path)
    pending = [i for i in range(len(prompts)) if i not in done]
    # Both models placed once, sharded like training shards them (no per-batch re-upload).
    params = frozen_params(policy.checkpoint, LM, partitioner)[0]
    scorer = RewardScorer.load(reward_dir, model, partitioner)
    ids = {i: converters.prompt_ids(prompts[i].conversation, vocab, max_prompt_len, system)
           for i in pending}
    group = max(1, batch_size // num_samples)
    root = jax.random.key(seed)
    bar = tqdm(total=len(prompts), initial=len(done), desc="best-of-n", dynamic_ncols=True)
    with open(samples_path, "a", encoding="utf-8") as out:
        for start in range(0, len(pending), group):
            chunk = pending[start:start + group]
            rows = [ids[i] for i in chunk for _ in range(num_samples)]
            keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(root, i), j))(
                np.repeat(np.asarray(chunk, np.uint32), num_samples),
                np.tile(np.arange(num_samples, dtype=np.uint32), len(chunk)))
            results = sample_and_score(
                params, policy.config, scorer.score_tokens, rows, keys, width=max_prompt_len,
                batch_size=batch_size, vocab=vocab, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, partitioner=partitioner)
            for k, index in enumerate(chunk):
                mine = results[k * num_samples:(k + 1) * num_samples]
                out.write(formats.jsonl_line({
                    "index": index, "prompt": prompts[index].text,
                    "responses": [r["text"] for r in mine],
                    "scores": [r["score"] for r in mine],
                    "finished": [r["finished"] for r in mine],
                    "num_tokens": [r["num_tokens"] for r in mine]}))
            out.flush()
            bar.update(len(chunk))
    bar.close()
    records = read_done(samples_path).values()
    finished = np.array([f for r in records for f in r["finished"]], bool)
    scores = np.array([s for r in records for s in r["scores"]], np.float64)
    return {"prompts": len(records), "num_samples": num_samples,
            "finished_fraction": float(finished.mean()),
            "mean_score": float(scores[finished].mean()) if finished.any() else None}


def select_best(samples_dir: str, prompts: list[formats.Prompt], threshold: float | None
                ) -> dict:
    """Best-of-n from SAMPLES_DIR/samples.jsonl under `threshold` (normalised reward units),
    written to SAMPLES_DIR/best_of_n.jsonl as ShareGPT; returns the selection statistics."""
    samples_path = os.path.join(samples_dir, SAMPLES_FILE)
    done = read_done(samples_path)
    winners, best_scores, mean_scores = [], [], []
    for index in sorted(done):
        record = done[index]
        best = best_index(np.array(record["scores"]), np.array(record["finished"]), threshold)
        if best is None:
            continue
        mean_scores.append(float(np.mean([s for s, f in zip(record["scores"],
                                                             record["finished"]) if f])))
        best_scores.append(record["scores"][best])
        conversation = prompts[index].conversation
        winners.append(formats.conversation_to_sharegpt(formats.Conversation(
            conversation.messages + (formats.Message(formats.ASSISTANT,
                                                     record["responses"][best]),))))
    if not winners:
        raise ConfigError(f"{samples_path}: no prompt has a finished response above the "
                          f"threshold ({threshold}); lower it or raise max_new_tokens")
    if jax.process_index() == 0:
        formats.write_jsonl(os.path.join(samples_dir, BEST_FILE), winners)
    selection = {"prompts": len(done), "kept": len(winners), "threshold": threshold,
                 "mean_score": float(np.mean(mean_scores)),  # finished responses, kept prompts
                 "mean_best_score": float(np.mean(best_scores))}
    print(f"[rejection] kept {len(winners)}/{len(done)} prompts; mean normalised score "
          f"{selection['mean_score']:.3f} → best {selection['mean_best_score']:.3f}")
    return selection


def train_rejection(workdir: str, model: LlamaConfig, train_steps: int, prompts_path: str, *,
                    policy_dir: str, reward_dir: str, stage: str = "rejection",
                    samples_stage: str = "xwin_set", num_samples: int = 16,
                    sample_batch_size: int = 64, max_new_tokens: int = 256,
                    temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
                    threshold: float | None = None, max_prompt_len: int = 1024,
                    max_prompts: int | None = None, batch_size: int = 16, seq_len: int = 2048,
                    system: str | None = None, optimizer: OptimizerConfig = OptimizerConfig(),
                    z_loss: float = 0.0, num_micro_batches: int = 1,
                    logits_chunk_size: int | None = None, checkpoint_every: int = 100,
                    keep_checkpoints: int = 3, async_checkpoints: bool = True,
                    vocabulary: Any = None, seed: int = 0,
                    partitioner: Partitioner | None = None) -> dict:
    """Best-of-n samples of the first max_prompts prompts (None: all) into
    WORKDIR/<samples_stage>/, then SFT from policy_dir on the winners into WORKDIR/<stage>/
    (exported with the tokenizer to final/). Sampling and fine-tune run on `partitioner`
    (default: every device); `vocabulary` overrides the one policy_dir records. `threshold`
    is in normalised reward units (the RM's reward_stats.json)."""
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples}: need at least 1")
    partitioner = partitioner or Partitioner()
    if sample_batch_size % partitioner.batch_divisor:
        raise ConfigError(f"sample_batch_size={sample_batch_size} does not divide over the "
                          f"{partitioner.batch_divisor} data shards (data x fsdp) of the mesh",
                          hint=f"use a multiple of {partitioner.batch_divisor}")
    start = Start.policy(model, policy_dir, vocabulary)
    reward = open_reward(reward_dir, model, start.vocabulary)
    check_context(start.config, max_prompt_len + max_new_tokens,
                  "max_prompt_len + max_new_tokens")
    prompts_identity = fingerprint.file_identity(prompts_path)
    prompts = formats.read_prompts(prompts_path).records[:max_prompts]
    sampling_settings = {"prompts": prompts_identity, "max_prompts": max_prompts,
                         "policy": start, "reward": reward, "num_samples": num_samples,
                         "max_new_tokens": max_new_tokens, "temperature": temperature,
                         "top_k": top_k, "top_p": top_p, "max_prompt_len": max_prompt_len,
                         "system": system, "seed": seed}
    samples_dir = os.path.join(workdir, samples_stage)
    samples = run_stage(samples_dir, samples_stage, sampling_settings, lambda d: sample_prompts(
        d, prompts, start, reward_dir, model, partitioner=partitioner,
        num_samples=num_samples, batch_size=sample_batch_size, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, max_prompt_len=max_prompt_len,
        system=system, seed=seed))
    # Chosen again on every run, so a changed threshold applies to the samples already drawn.
    selection = select_best(samples_dir, prompts, threshold)
    data = SftData([os.path.join(samples_dir, BEST_FILE)], seq_len=seq_len,
                   batch_size=batch_size, seed=seed, system=system
                   ).with_vocabulary(start.vocabulary)
    settings = {"samples": samples["fingerprint"], "threshold": threshold, "start": start,
                "train_steps": train_steps, "train_data": data, "optimizer": optimizer,
                "z_loss": z_loss, "seed": seed}
    return run_stage(os.path.join(workdir, stage), stage, settings, lambda stage_dir: dict(
        fit(stage_dir, start, train_steps, data, partitioner=partitioner, optimizer=optimizer,
            z_loss=z_loss, num_micro_batches=num_micro_batches,
            logits_chunk_size=logits_chunk_size, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints, seed=seed,
            description=stage),
        selection=selection, samples=samples))
