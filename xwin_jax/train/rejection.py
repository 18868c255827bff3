"""Rejection sampling (best-of-n, Xwin-Set): sample n responses per prompt from the policy,
score them with the reward model, keep the best (optionally only above a threshold), write the
winners as SFT data, and fine-tune the policy on them (sft.fit).

Two stages (stage.run_stage), so that changing only the fine-tune keeps the expensive samples:

    WORKDIR/<samples_stage>/        (default xwin_set; or `samples_dir`) the samples, a stage
      samples.jsonl                 of its own: its fingerprint is the prompts file, the
                                    policy and reward models, n and the sampling settings.
                                    The Xwin-Set file: per prompt (`index`, `prompt` — text,
                                    or the messages of a conversation) all n `responses` in
                                    sample order, their normalised RM `scores`, `finished`
                                    (ended with EOS) and `num_tokens`; appended as the
                                    batches finish (a killed run resumes there). DPO pairs
                                    are made from it by data/xwin_set.py (XwinSetPairsData).
      best_of_n.jsonl               the winners under this run's threshold, ShareGPT (what
      best_of_<k>.jsonl             SftData reads), chosen anew from samples.jsonl every run;
                                    with best_of=k, among each prompt's first k samples
    WORKDIR/<stage>/                (default rejection) the fine-tune on the winners; its
      final/                        fingerprint holds the samples', the threshold and k

Best-of-k for any k <= n from one sampling run: sample j of prompt i has its own key
(fold_in(fold_in(key(seed), i), j)), so the first k of n samples are exactly what a k-sample
run draws. A sweep over k shares one samples stage through `samples_dir` (each point its
own WORKDIR for the fine-tune; the samples stage is found finished and skipped): draw once,
fine-tune for every k.

Responses that never emit EOS, or are empty, are never chosen. n may be as large as 64
(the Xwin-Set setting).

Batching (length buckets). The (prompt, sample) rows of the WHOLE prompt list — every prompt's
n rows together, prompts sorted by (token length, index) — are cut into batches of
sample_batch_size rows; each batch is left-padded to its own width (its longest prompt
rounded up to a multiple of 64, at most max_prompt_len), so the KV cache and the reward
model's input are sized by the bucket + max_new_tokens, not by max_prompt_len. The policy is
resharded once into the decode layout (decoding.py, `decode_layout`); the reward model scores
in the training layout. Each (prompt, sample) has its own PRNG key, so a sample does not
depend on its batch-mates or its bucket.

samples.jsonl holds one record per prompt (its n responses), appended when the batch holding
its last row is done: the file is in length order, and is read back by `index`. The batches
are cut from the whole prompt list, not from what is missing, so a killed run reruns exactly
the batches that still hold a missing prompt (the same programs on the same rows: the same
samples and scores) and appends only the missing records; the file it ends with is the one an
uninterrupted run writes. (sample_batch_size is not in the fingerprint: a resume with another
batch size regroups the rows, which leaves the texts as they were and may move a score in its
last bits.)

On N hosts (`--multihost`, as the generate job) every host reads every prompt and runs the
same batches (the global batch is given on every host), every host gets every sample and
score, and host 0 alone appends to samples.jsonl and writes best_of_n.jsonl; the fine-tune
(sft.fit) gives each host its own rows.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from xwin_jax import fingerprint
from xwin_jax.data import converters, formats, xwin_set
from xwin_jax.data.sft_data import SftData
from xwin_jax.decoding import DecodeLayout, Decoder
from xwin_jax.errors import ConfigError
from xwin_jax.generate import read_done
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM, check_context
from xwin_jax.partitioning import Partitioner, check_same_on_hosts, sync_hosts
from xwin_jax.rewards import RewardScorer, open_reward
from xwin_jax.train import rollout
from xwin_jax.train.sft import fit
from xwin_jax.train.sharded import Start, frozen_params
from xwin_jax.train.stage import run_stage
from xwin_jax.train.state import OptimizerConfig

SAMPLES_FILE = "samples.jsonl"
BEST_FILE = "best_of_n.jsonl"


def best_file(best_of: int | None) -> str:
    """The winners' file name: best_of_n.jsonl over all n samples, best_of_<k>.jsonl."""
    return BEST_FILE if best_of is None else f"best_of_{best_of}.jsonl"


def sample_keys(seed: int, rows: list[tuple[int, int]]) -> jax.Array:
    """A PRNG key per (prompt index, sample index) row: fold_in(fold_in(key(seed), i), j)."""
    root = jax.random.key(seed)
    prompt, sample = (np.asarray(column, np.uint32) for column in zip(*rows))
    return jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(root, i), j))(
        prompt, sample)


def sample_batches(ids: list[list[int]], num_samples: int, batch_size: int,
                   max_prompt_len: int) -> list[tuple[list[tuple[int, int]], int]]:
    """The (prompt, sample) rows of every prompt, prompts sorted by (length, index), cut into
    batches of at most batch_size rows, each with its width: its longest prompt rounded up
    to a multiple of 64, at most max_prompt_len (the length buckets)."""
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    rows = [(i, j) for i in order for j in range(num_samples)]
    batches = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        batches.append((chunk, converters.bucket_width(max(len(ids[i]) for i, _ in chunk),
                                                       limit=max_prompt_len)))
    return batches


def sample_and_score(decoder: Decoder, weights: Any, scorer: RewardScorer,
                     ids: list[list[int]], rows: list[tuple[int, int]], *, width: int,
                     batch_size: int, seed: int, vocab, **sampling_kwargs) -> list[dict]:
    """One sample per (prompt, sample) row (prompt `ids[i]` left-padded to `width`, the
    batch filled up to batch_size rows) → [{"text", "score", "finished", "num_tokens"}] in
    row order. The whole batch is given on every host; every host gets every result."""
    padded = rows + [rows[-1]] * (batch_size - len(rows))  # fixed batch shape
    batch = converters.left_padded_batch([ids[i] for i, _ in padded], width, vocab.pad_id)
    generation = decoder.generate(weights, batch["tokens"], batch["mask"],
                                  sample_keys(seed, padded), stop_ids=(vocab.eos_id,),
                                  pad_id=vocab.pad_id, **sampling_kwargs)
    # Scored on the width used: the bucket + max_new_tokens.
    assembled = rollout.assemble(batch["tokens"], batch["mask"], generation)
    scores = scorer.score_tokens(assembled["tokens"], assembled["mask"])
    texts = generation.texts(vocab)
    return [{"text": texts[r], "score": float(scores[r]),
             "finished": bool(generation.finished[r]),
             "num_tokens": int(generation.lengths[r])} for r in range(len(rows))]


def sample_prompts(stage_dir: str, prompts: list[formats.Prompt], policy: Start,
                   reward_dir: str, model: LlamaConfig, *, partitioner: Partitioner,
                   decode_layout: DecodeLayout | None = None, num_samples: int,
                   batch_size: int, max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float, max_prompt_len: int, system: str | None, seed: int) -> dict:
    """The samples stage's body: samples and scores every prompt not yet in
    STAGE_DIR/samples.jsonl (n per prompt, keys by (prompt, sample), batches cut by length
    from the whole prompt list: see the module docstring); returns statistics of all of
    them. On N hosts every host runs every batch and host 0 alone appends."""
    from tqdm import tqdm

    vocab = policy.vocabulary
    samples_path = os.path.join(stage_dir, SAMPLES_FILE)
    done = read_done(samples_path)
    check_same_on_hosts(list(done), f"the prompts already in {samples_path}")
    sync_hosts("rejection: samples read")  # before host 0 appends to them
    ids = [converters.prompt_ids(p.conversation, vocab, max_prompt_len, system)
           for p in prompts]
    batches = [(rows, width) for rows, width in
               sample_batches(ids, num_samples, batch_size, max_prompt_len)
               if any(i not in done for i, _ in rows)]
    decoder = Decoder.create(policy.config, partitioner, decode_layout)
    if batches:
        # The policy in the decode layout (one reshard, compute dtype), the reward model in
        # the training layout: both placed once.
        weights = decoder.weights(frozen_params(policy.checkpoint, LM, partitioner)[0])
        scorer = RewardScorer.load(reward_dir, model, partitioner)
    drawn: dict[int, dict[int, dict]] = {}  # a prompt's samples until all n are in
    bar = tqdm(total=len(prompts), initial=len(done), desc="best-of-n", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    for rows, width in batches:
        results = sample_and_score(
            decoder, weights, scorer, ids, rows, width=width, batch_size=batch_size,
            seed=seed, vocab=vocab, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p)
        complete = []
        for (index, sample), result in zip(rows, results):
            if index in done:
                continue  # a batch-mate of a missing prompt: drawn again, written already
            drawn.setdefault(index, {})[sample] = result
            if len(drawn[index]) == num_samples:
                complete.append(index)
        records = []
        for index in complete:
            mine = [r for _, r in sorted(drawn.pop(index).items())]
            records.append({"index": index,
                            "prompt": formats.prompt_to_json(prompts[index].conversation),
                            "responses": [r["text"] for r in mine],
                            "scores": [r["score"] for r in mine],
                            "finished": [r["finished"] for r in mine],
                            "num_tokens": [r["num_tokens"] for r in mine]})
        if records and jax.process_index() == 0:
            formats.append_jsonl(samples_path, records)
        bar.update(len(records))
    bar.close()
    sync_hosts("rejection: samples written")  # before any host reads them back
    records = read_done(samples_path).values()
    finished = np.array([f for r in records for f in r["finished"]], bool)
    scores = np.array([s for r in records for s in r["scores"]], np.float64)
    return {"prompts": len(records), "num_samples": num_samples,
            "finished_fraction": float(finished.mean()),
            "mean_score": float(scores[finished].mean()) if finished.any() else None}


def select_best(samples_dir: str, prompts: list[formats.Prompt], threshold: float | None,
                best_of: int | None = None) -> dict:
    """Best-of-n (best_of=k: of each prompt's first k samples) from SAMPLES_DIR/samples.jsonl
    under `threshold` (normalised reward units), written to SAMPLES_DIR/best_file(best_of) as
    ShareGPT (by host 0; every host returns once it is there); returns the selection
    statistics. Unfinished and empty responses are never chosen (xwin_set.eligible)."""
    samples_path = os.path.join(samples_dir, SAMPLES_FILE)
    entries = formats.read_xwin_set(samples_path).records
    winners, best_scores, mean_scores = [], [], []
    for entry in sorted(entries, key=lambda e: e.index):
        best = xwin_set.best_of(entry, best_of, threshold)
        if best is None:
            continue
        mean_scores.append(float(np.mean([entry.scores[i]
                                           for i in xwin_set.eligible(entry, best_of)])))
        best_scores.append(entry.scores[best])
        conversation = prompts[entry.index].conversation
        winners.append(formats.conversation_to_sharegpt(formats.Conversation(
            conversation.messages + (formats.Message(formats.ASSISTANT,
                                                     entry.responses[best]),))))
    if not winners:
        raise ConfigError(f"{samples_path}: no prompt has a finished response above the "
                          f"threshold ({threshold}); lower it or raise max_new_tokens")
    path = os.path.join(samples_dir, best_file(best_of))
    if jax.process_index() == 0:
        formats.write_jsonl(path, winners)
    sync_hosts("rejection: best of n written")  # every host's SftData reads it
    selection = {"prompts": len(entries), "kept": len(winners), "threshold": threshold,
                 "best_of": best_of or len(entries[0].responses), "winners_file": path,
                 "mean_score": float(np.mean(mean_scores)),  # eligible responses, kept prompts
                 "mean_best_score": float(np.mean(best_scores))}
    if jax.process_index() == 0:
        print(f"[rejection] best of {selection['best_of']}: kept {len(winners)}/{len(entries)} "
              f"prompts; mean normalised score {selection['mean_score']:.3f} → best "
              f"{selection['mean_best_score']:.3f}")
    return selection


def train_rejection(workdir: str, model: LlamaConfig, train_steps: int, prompts_path: str, *,
                    policy_dir: str, reward_dir: str, stage: str = "rejection",
                    samples_stage: str = "xwin_set", samples_dir: str | None = None,
                    num_samples: int = 16, best_of: int | None = None,
                    sample_batch_size: int = 64, max_new_tokens: int = 256,
                    temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
                    threshold: float | None = None, max_prompt_len: int = 1024,
                    max_prompts: int | None = None, batch_size: int = 16, seq_len: int = 2048,
                    system: str | None = None, optimizer: OptimizerConfig = OptimizerConfig(),
                    z_loss: float = 0.0, num_micro_batches: int = 1,
                    logits_chunk_size: int | None = None, checkpoint_every: int = 100,
                    keep_checkpoints: int = 3, async_checkpoints: bool = True,
                    vocabulary: Any = None, seed: int = 0,
                    partitioner: Partitioner | None = None,
                    decode_layout: DecodeLayout | None = None) -> dict:
    """Best-of-n samples of the first max_prompts prompts (None: all) into
    WORKDIR/<samples_stage>/ (or `samples_dir`, e.g. one shared by a sweep over best_of),
    then SFT from policy_dir on the winners — of all n samples, or with best_of=k of each
    prompt's first k — into WORKDIR/<stage>/ (exported with the tokenizer to final/).
    Sampling and fine-tune run on `partitioner` (default: every device), the sampling's
    policy in `decode_layout` (decoding.DecodeLayout: how its weights are split while
    decoding; like the mesh, not part of the fingerprint); `vocabulary` overrides the one
    policy_dir records. `threshold` is in normalised reward units (the RM's
    reward_stats.json)."""
    if num_samples < 1:
        raise ConfigError(f"num_samples={num_samples}: need at least 1")
    if best_of is not None and not 1 <= best_of <= num_samples:
        raise ConfigError(f"best_of={best_of}: choose k in 1..num_samples ({num_samples}); the "
                          f"first k of the n samples are used")
    partitioner = partitioner or Partitioner()
    if sample_batch_size % partitioner.batch_divisor:
        raise ConfigError(f"sample_batch_size={sample_batch_size} does not divide over the "
                          f"{partitioner.batch_divisor} data shards (data x fsdp) of the mesh",
                          hint=f"use a multiple of {partitioner.batch_divisor}")
    decoding = partitioner.decoding((decode_layout or DecodeLayout()).tensor)
    if sample_batch_size % decoding.batch_divisor:
        raise ConfigError(f"sample_batch_size={sample_batch_size} does not divide over the "
                          f"{decoding.batch_divisor} copies of the policy in the decode layout "
                          f"(tensor={decoding.sizes['tensor']})",
                          hint=f"use a multiple of {decoding.batch_divisor}, or set "
                               f"decoding.DecodeLayout.tensor")
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
    samples_dir = samples_dir or os.path.join(workdir, samples_stage)
    samples = run_stage(samples_dir, samples_stage, sampling_settings, lambda d: sample_prompts(
        d, prompts, start, reward_dir, model, partitioner=partitioner,
        decode_layout=decode_layout, num_samples=num_samples, batch_size=sample_batch_size,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        max_prompt_len=max_prompt_len, system=system, seed=seed))
    # Chosen again on every run, so a changed threshold applies to the samples already drawn.
    selection = select_best(samples_dir, prompts, threshold, best_of)
    data = SftData([selection["winners_file"]], seq_len=seq_len,
                   batch_size=batch_size, seed=seed, system=system
                   ).with_vocabulary(start.vocabulary)
    settings = {"samples": samples["fingerprint"], "threshold": threshold, "start": start,
                "train_steps": train_steps, "train_data": data, "optimizer": optimizer,
                "z_loss": z_loss, "seed": seed}
    if best_of is not None:  # absent when unset: the fingerprints of earlier runs still hold
        settings["best_of"] = best_of
    return run_stage(os.path.join(workdir, stage), stage, settings, lambda stage_dir: dict(
        fit(stage_dir, start, train_steps, data, partitioner=partitioner, optimizer=optimizer,
            z_loss=z_loss, num_micro_batches=num_micro_batches,
            logits_chunk_size=logits_chunk_size, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints, seed=seed,
            description=stage),
        selection=selection, samples=samples))
