"""Rejection sampling (best-of-n, Xwin-Set): sample n responses per prompt from the policy,
score them with the reward model, keep the best (optionally only above a threshold), write the
winners as SFT data, and fine-tune on them with the SFT stage.

    WORKDIR/<stage>/samples.jsonl   every prompt's n responses, scores and the chosen index
                                    (appended per prompt group: a killed run resumes there)
    WORKDIR/<stage>/best_of_n.jsonl the winners, ShareGPT format (what SftData reads)
    WORKDIR/<stage>/final           the fine-tuned policy (train_sft into the same stage)

Responses that never emit EOS are never chosen. n may be as large as 64 (the Xwin-Set
setting); rows are generated in fixed-shape batches, so one program serves every group.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from xwin_jax import sampling
from xwin_jax.checkpoints.params import load_config, load_params
from xwin_jax.data import converters, formats
from xwin_jax.data.sft_data import SftData
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError
from xwin_jax.generate import read_done
from xwin_jax.models import heads
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.llama import param_logical_axes, param_shapes
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import rollout
from xwin_jax.train.loop import finished_summary, write_summary
from xwin_jax.train.sft import train_sft
from xwin_jax.train.sharded import put_global

SAMPLES_FILE = "samples.jsonl"
BEST_FILE = "best_of_n.jsonl"
SETTINGS_FILE = "sampling.json"


def best_index(scores: np.ndarray, finished: np.ndarray, threshold: float | None) -> int | None:
    """The highest-scoring finished response, or None when none is finished or the best is
    below the threshold."""
    eligible = np.where(finished, scores, -np.inf)
    best = int(np.argmax(eligible))
    if not np.isfinite(eligible[best]) or (threshold is not None and eligible[best] < threshold):
        return None
    return best


def _check_sampling_settings(stage_dir: str, settings: dict) -> None:
    """Records what samples.jsonl is drawn with; a resumed run with other settings would mix
    two distributions in one file, so it stops and names the difference."""
    path = os.path.join(stage_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ConfigError(f"{os.path.join(stage_dir, SAMPLES_FILE)} was sampled with other "
                              f"settings {changed} (before, now); move it away to start over")
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def _placed(directory: str, partitioner: Partitioner, logical_axes: Any, shapes: Any,
            scan_layers: bool) -> Any:
    """A checkpoint's params as global arrays in the partitioner's shardings."""
    shardings = partitioner.shardings_for(logical_axes, shapes)
    params = load_params(directory, scan_layers=scan_layers, to_host=True)[1]
    return jax.tree.map(lambda x, s: put_global(np.asarray(x), s), params, shardings)


def sample_and_score(params: Any, cfg: LlamaConfig, score_fn: Callable, ids: list[list[int]],
                     keys: jax.Array, *, width: int, batch_size: int, vocab,
                     **sampling_kwargs) -> list[dict]:
    """One sample per row of `ids` (left-padded to `width`, in fixed batches of batch_size
    rows) → [{"text", "score", "finished", "num_tokens"}] in row order."""
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


def rejection_sample(stage_dir: str, prompts_path: str, policy_dir: str, reward_dir: str,
                     model: LlamaConfig, *, num_samples: int = 16, batch_size: int = 64,
                     max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
                     top_p: float = 1.0, threshold: float | None = None,
                     max_prompt_len: int = 512, vocabulary: str = "bytes",
                     system: str | None = None, seed: int = 0, max_prompts: int | None = None,
                     partitioner: Partitioner | None = None) -> dict:
    """Samples and scores every prompt (the first max_prompts) not yet in
    STAGE_DIR/samples.jsonl, then writes best_of_n.jsonl from all of them; returns selection
    statistics. `threshold` is in normalised reward units (the RM's reward_stats.json)."""
    from tqdm import tqdm

    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples}: need at least 1")
    if jax.process_count() > 1:
        raise ConfigError("rejection sampling runs on one host for now (one writer of "
                          "samples.jsonl)", hint="run one process and shard over its local "
                                                 "devices")
    os.makedirs(stage_dir, exist_ok=True)
    vocab = get_vocabulary(vocabulary)
    prompts = formats.read_prompts(prompts_path).records[:max_prompts]
    samples_path = os.path.join(stage_dir, SAMPLES_FILE)
    _check_sampling_settings(stage_dir, {
        "prompts_path": os.path.abspath(prompts_path), "policy_dir": os.path.abspath(policy_dir),
        "reward_dir": os.path.abspath(reward_dir), "num_samples": num_samples,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
        "top_p": top_p, "max_prompt_len": max_prompt_len, "system": system, "seed": seed})
    done = read_done(samples_path)
    pending = [i for i in range(len(prompts)) if i not in done]
    runtime = model.runtime_fields()
    partitioner = partitioner or Partitioner({"data": 1, "fsdp": 1, "tensor": 1})
    policy_cfg = load_config(policy_dir).replace(**runtime)
    reward_cfg = load_config(reward_dir).replace(**runtime)
    # Both models placed once, sharded like training shards them (no per-batch re-upload).
    policy = _placed(policy_dir, partitioner, param_logical_axes(policy_cfg),
                     param_shapes(policy_cfg), policy_cfg.scan_layers)
    reward_shardings = partitioner.shardings_for(heads.reward_param_logical_axes(reward_cfg),
                                                 heads.reward_param_shapes(reward_cfg))
    reward = _placed(reward_dir, partitioner, heads.reward_param_logical_axes(reward_cfg),
                     heads.reward_param_shapes(reward_cfg), reward_cfg.scan_layers)
    stats = rollout.load_reward_stats(reward_dir)
    scorer = partitioner.partition(
        lambda params, tokens, mask: (rollout.reward_scores(reward_cfg, params, tokens, mask)
                                      - stats["mean"]) / stats["std"],
        in_shardings=(reward_shardings, partitioner.batch_sharding,
                      partitioner.batch_sharding),
        out_shardings=partitioner.replicated)

    def score_fn(tokens, mask):
        sharded = partitioner.shard_batch({"tokens": tokens, "mask": mask})
        return scorer(reward, sharded["tokens"], sharded["mask"])
    ids = {i: converters.prompt_ids(prompts[i].conversation, vocab, max_prompt_len, system)
           for i in pending}
    group = max(1, batch_size // num_samples)
    root = jax.random.key(seed)
    bar = tqdm(total=len(prompts), initial=len(done), desc="best-of-n", dynamic_ncols=True)
    with open(samples_path, "a", encoding="utf-8") as out:
        for start in range(0, len(pending), group):
            chunk = pending[start:start + group]
            rows = [ids[i] for i in chunk for _ in range(num_samples)]
            # A key per (prompt, sample): results do not depend on batching or resume.
            keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(root, i), j))(
                np.repeat(np.asarray(chunk, np.uint32), num_samples),
                np.tile(np.arange(num_samples, dtype=np.uint32), len(chunk)))
            results = sample_and_score(
                policy, policy_cfg, score_fn, rows, keys, width=max_prompt_len,
                batch_size=batch_size, vocab=vocab, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, partitioner=partitioner)
            for k, index in enumerate(chunk):
                mine = results[k * num_samples:(k + 1) * num_samples]
                scores = np.array([r["score"] for r in mine])
                finished = np.array([r["finished"] for r in mine])
                out.write(formats.jsonl_line({
                    "index": index, "prompt": prompts[index].text,
                    "responses": [r["text"] for r in mine], "scores": scores.tolist(),
                    "finished": finished.tolist(),
                    "best": best_index(scores, finished, threshold)}))
            out.flush()
            bar.update(len(chunk))
    bar.close()
    done = read_done(samples_path)
    winners, best_scores, mean_scores = [], [], []
    for index in sorted(done):
        record = done[index]
        # Chosen again here, so a changed threshold applies to prompts sampled earlier too.
        record["best"] = best_index(np.array(record["scores"]), np.array(record["finished"]),
                                    threshold)
        if record["best"] is None:
            continue
        finished_scores = [s for s, f in zip(record["scores"], record["finished"]) if f]
        mean_scores.append(float(np.mean(finished_scores)))
        best_scores.append(record["scores"][record["best"]])
        conversation = prompts[index].conversation
        winners.append(formats.conversation_to_sharegpt(formats.Conversation(
            conversation.messages + (formats.Message(formats.ASSISTANT,
                                                     record["responses"][record["best"]]),))))
    if not winners:
        raise ConfigError(f"{samples_path}: no prompt has a finished response above the "
                          f"threshold ({threshold}); lower it or raise max_new_tokens")
    formats.write_jsonl(os.path.join(stage_dir, BEST_FILE), winners)
    selection = {"prompts": len(done), "kept": len(winners), "num_samples": num_samples,
                 "mean_score": float(np.mean(mean_scores)),  # finished responses, kept prompts
                 "mean_best_score": float(np.mean(best_scores))}
    print(f"[rejection] kept {len(winners)}/{len(done)} prompts; mean normalised score "
          f"{selection['mean_score']:.3f} → best-of-{num_samples} {selection['mean_best_score']:.3f}")
    return selection


def train_rejection(workdir: str, model: LlamaConfig, train_steps: int, prompts_path: str, *,
                    policy_dir: str, reward_dir: str, stage: str = "rejection",
                    num_samples: int = 16, sample_batch_size: int = 64,
                    max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
                    top_p: float = 1.0, threshold: float | None = None,
                    max_prompt_len: int = 512, batch_size: int = 16, seq_len: int = 512,
                    vocabulary: str = "bytes", system: str | None = None, seed: int = 0,
                    max_prompts: int | None = None, partitioner: Partitioner | None = None,
                    **sft_kwargs) -> dict:
    """Best-of-n selection, then SFT from policy_dir on the winners into WORKDIR/<stage>/
    (sft_kwargs: learning_rate, warmup_steps, ... of train_sft)."""
    stage_dir = os.path.join(workdir, stage)
    done = finished_summary(stage_dir, stage)
    if done is not None:
        return done
    started = time.perf_counter()
    selection = rejection_sample(
        stage_dir, prompts_path, policy_dir, reward_dir, model, num_samples=num_samples,
        batch_size=sample_batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, threshold=threshold, max_prompt_len=max_prompt_len,
        vocabulary=vocabulary, system=system, seed=seed, max_prompts=max_prompts,
        partitioner=partitioner)
    data = SftData([os.path.join(stage_dir, BEST_FILE)], seq_len=seq_len,
                   batch_size=batch_size, vocabulary=vocabulary, seed=seed, system=system)
    summary = train_sft(workdir, model, train_steps, data, partitioner=partitioner,
                        stage=stage, init_params_dir=policy_dir, seed=seed, **sft_kwargs)
    summary.update(selection=selection, wall_time_s=round(time.perf_counter() - started, 2))
    write_summary(stage_dir, summary)
    return summary
