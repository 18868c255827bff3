"""How far the offline demo's models get on the synthetic suite: SFT held-out task accuracy by
family, and the reward model's held-out pair accuracy by pair kind, against model size and
training steps (issue 18: what it takes for correctness, not length, to be learnable).

    python bench/demo_curves.py                       # the quickstart's tiny model, then 0.87M
    python bench/demo_curves.py --sizes 64x2 --sft_steps 250,500 --rm_steps 150
    F="--sizes 64x2 --families copy,uppercase,first_letter,last_letter,arithmetic --sft_steps 800"
    python bench/demo_curves.py $F --rm_steps 150,300 --rm_lr 3e-4,1e-3,3e-3
    python bench/demo_curves.py $F --rm_steps 500,1000 --rm_pairs as_long  # no length cue
    python bench/demo_curves.py $F --rm_steps 150,300 --rm_readout implicit

Each size is one SFT run on the suite (by default all its families, 6000 prompts, the
quickstart's template without a system line, 12 × 320 packed rows; --system, --families,
--num_prompts, --seq_len and --batch_size change them), AdamW with cosine decay over the
longest step count, its held-out accuracy measured at each requested step by sampling the
quickstart's 384 held-out prompts at temperature 0.7 (and greedily). Its last weights are
saved in --workdir and read back by a later run of the same setting. Then the SFT model's own
ranking of the held-out pairs by response log-likelihood (what its trunk already knows), and
from its weights one reward-model run per --rm_lr on the suite's train pairs (--rm_pairs: all,
or only the correct-vs-wrong ones, or only those of equal length; --rm_readout: Xwin's
last-token head, a mean over tokens, or DPO's implicit reward, summed or per token), scored
on every held-out pair at each requested step, by kind (synthetic.pair_kind) and, for
correct-vs-wrong pairs, by family and whether the correct side is shorter, as long or longer.
One JSON line per measurement is printed and appended to --out. Not a test: nothing here
gates CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xwin_jax import sampling  # noqa: E402
from xwin_jax.data import converters, formats, synthetic, template  # noqa: E402
from xwin_jax.data.pairs_data import PairsData  # noqa: E402
from xwin_jax.data.sft_data import SftData  # noqa: E402
from xwin_jax.data.vocabulary import ByteVocabulary  # noqa: E402
from xwin_jax.models import heads  # noqa: E402
from xwin_jax.models.config import preset  # noqa: E402
from xwin_jax.models.llama import init_params  # noqa: E402
from xwin_jax.train.dpo import pair_logprobs  # noqa: E402
from xwin_jax.train.reward import pair_rewards, reward_loss_fn  # noqa: E402
from xwin_jax.train.sft import sft_loss_fn  # noqa: E402
from xwin_jax.train.step import LossOutput  # noqa: E402
from xwin_jax.train.state import OptimizerConfig  # noqa: E402


def model_config(size: str):
    """'HIDDENxLAYERS' → the tiny preset at that width and depth (FFN 2.75 × hidden, 4
    heads, 2 KV heads)."""
    hidden, layers = (int(v) for v in size.split("x"))
    return preset("tiny", hidden_size=hidden, num_layers=layers,
                  intermediate_size=int(hidden * 2.75) // 8 * 8)


def make_step(loss_fn, tx):
    @jax.jit
    def step(params, opt_state, batch):
        def mean_loss(p):
            out = loss_fn(p, batch)
            return out.objective / jnp.maximum(out.count, 1)
        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def held_out_accuracy(params, cfg, prompts, vocab, temperature, max_new_tokens, batch=64,
                      system=None):
    """(overall accuracy, {family: accuracy}, finished share) of one sample per prompt."""
    ids = [converters.prompt_ids(formats.Conversation((formats.Message(formats.USER, p),)),
                                 vocab, 256, system) for p in prompts]
    responses, finished = [], []
    for first in range(0, len(ids), batch):
        chunk = ids[first:first + batch]
        rows = chunk + [chunk[-1]] * (batch - len(chunk))
        padded = converters.left_padded_batch(rows, max(len(r) for r in rows), vocab.pad_id)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            jax.random.key(0), np.arange(first, first + batch, dtype=np.uint32))
        out = sampling.generate(params, cfg, padded["tokens"], padded["mask"], keys,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                stop_ids=(vocab.eos_id,), pad_id=vocab.pad_id)
        responses += out.texts(vocab)[:len(chunk)]
        finished += [bool(f) for f in out.finished[:len(chunk)]]
    verdicts = synthetic.correct_by_family(prompts, responses)
    overall = float(np.mean([v for vs in verdicts.values() for v in vs]))
    return overall, {k: round(float(np.mean(v)), 3) for k, v in verdicts.items()}, \
        float(np.mean(finished))


def pair_groups(pairs) -> tuple[np.ndarray, np.ndarray]:
    """Each held-out pair's kind (synthetic.pair_kind) and, for correct-vs-wrong pairs, its
    family and whether the correct side is the shorter, as long, or the longer one — a
    length preference alone wins the first, loses the last."""
    kinds, details = [], []
    for p in pairs:
        kind = synthetic.pair_kind(p.prompt, p.chosen, p.rejected)
        family = synthetic.solve_conversation(p.prompt)[0]
        sign = np.sign(len(p.chosen) - len(p.rejected))
        kinds.append(kind)
        details.append(f"{family}/{('shorter', 'as long', 'longer')[int(sign) + 1]}"
                       if kind == "correct_vs_wrong" else kind)
    return np.asarray(kinds), np.asarray(details)


def grouped(correct: np.ndarray, groups: np.ndarray) -> dict:
    return {g: (round(float(correct[groups == g].mean()), 3), int((groups == g).sum()))
            for g in sorted(set(groups))}


def pair_accuracy(score, params, pairs_data, kinds, details, batch=16):
    """(overall accuracy, {kind: (accuracy, pairs)}, {detail: (accuracy, pairs)}) over every
    held-out pair."""
    arrays, n = pairs_data.arrays, pairs_data.num_pairs
    correct = []
    for first in range(0, n, batch):
        rows = np.minimum(np.arange(first, first + batch), n - 1)
        chosen, rejected = score(params, {k: v[rows] for k, v in arrays.items()})
        correct += list(np.asarray(chosen > rejected)[:min(batch, n - first)])
    correct = np.asarray(correct)
    return float(correct.mean()), grouped(correct, kinds), grouped(correct, details)


def train_sft(size, args, paths, held_out, vocab, log):
    """The SFT weights at the last requested step, logging held-out accuracy at each; read
    back from --workdir when a run of the same setting saved them (the RM runs then start
    at once)."""
    cfg = model_config(size)
    lr = args.lr or (3e-3 if cfg.hidden_size <= 64 else 1e-3)
    sft_steps = sorted(int(s) for s in args.sft_steps.split(","))
    params = init_params(cfg, jax.random.key(0))
    saved = os.path.join(args.workdir, f"sft-{size}-{sft_steps[-1]}-lr{lr}-{args.setting_id}"
                                       ".msgpack")
    if os.path.exists(saved):
        with open(saved, "rb") as f:
            print(f"[{size}] SFT weights from {saved}", flush=True)
            return cfg, serialization.from_bytes(params, f.read())
    data = SftData([paths["sft_train"]], seq_len=args.seq_len, batch_size=args.batch_size,
                   vocabulary=vocab, system=args.system)
    tx, _ = OptimizerConfig(learning_rate=lr, warmup_steps=20).build(sft_steps[-1])
    step = make_step(sft_loss_fn(cfg), tx)
    opt_state = tx.init(params)
    batches, began = data.batches(0), time.perf_counter()
    print(f"[{size}] {cfg.num_params() / 1e6:.2f}M parameters, SFT lr {lr}", flush=True)
    for i in range(1, sft_steps[-1] + 1):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        params, opt_state, loss = step(params, opt_state, batch)
        if i in sft_steps:
            train_s = time.perf_counter() - began
            for temperature in (0.7, 0.0):
                acc, fam, fin = held_out_accuracy(params, cfg, held_out, vocab, temperature,
                                                  args.max_new_tokens, system=args.system)
                log({"stage": "sft", "size": size, "params_m": round(cfg.num_params() / 1e6, 3),
                     "steps": i, "temperature": temperature, "loss": round(float(loss), 4),
                     "accuracy": round(acc, 3), "finished": round(fin, 3), "by_family": fam,
                     "train_s": round(train_s, 1)})
    with open(saved + ".tmp", "wb") as f:
        f.write(serialization.to_bytes(params))
    os.replace(saved + ".tmp", saved)
    return cfg, params


def train_pairs_file(path: str, keep: str, workdir: str) -> str:
    """The suite's train pairs, or those of one group (--rm_pairs): 'correct_vs_wrong', or
    'as_long' (correct-vs-wrong pairs whose sides are as long: no length cue) — to tell
    whether correctness is learnable at all from what the suite gives."""
    if keep == "all":
        return path
    out = os.path.join(workdir, f"pairs_train-{keep}.jsonl")
    with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as w:
        for line in f:
            record = json.loads(line)
            prompt = record["prompt"]
            chosen, rejected = record["chosen"], record["rejected"]
            if synthetic.pair_kind(prompt, chosen, rejected) == "correct_vs_wrong" and (
                    keep == "correct_vs_wrong" or len(chosen) == len(rejected)):
                w.write(line)
    return out


def likelihood_ranking(size, cfg, sft_params, args, paths, vocab, log):
    """How the SFT model itself ranks the held-out pairs by the log-likelihood of each side's
    response (the sum over its tokens): whether the trunk the reward model starts from
    already tells a right answer from a wrong one."""
    valid = PairsData([paths["pairs_valid"]], seq_len=args.seq_len, batch_size=1,
                      vocabulary=vocab, system=args.system)
    kinds, details = pair_groups(valid.pairs)
    score = jax.jit(lambda p, b: pair_logprobs(cfg, p, b))
    acc, by_kind, by_detail = pair_accuracy(score, sft_params, valid, kinds, details)
    log({"stage": "sft_likelihood", "size": size, "sft_steps": args.sft_steps.split(",")[-1],
         "accuracy": round(acc, 3), "by_kind": by_kind,
         "correct_vs_wrong": {k: v for k, v in by_detail.items() if "/" in k}})


def mean_rewards(model, params, batch, over="response"):
    """(r_chosen, r_rejected): the mean of the per-token scores over each response's tokens
    and </s> (over='response') or over every real token (over='all') — readouts where a
    position can score its own token against what the position before it predicted, which
    the last token alone cannot see in two layers."""
    width = batch["chosen_tokens"].shape[1]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]])
    mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
    pooled_over = mask if over == "all" else jnp.concatenate(
        [batch["chosen_response_mask"], batch["rejected_response_mask"]])
    scores = model.apply({"params": params}, tokens, mask, per_token=True)
    pooled = jnp.sum(scores * pooled_over, axis=1) / jnp.maximum(jnp.sum(pooled_over, axis=1), 1)
    return tuple(jnp.split(pooled, 2))


def mean_readout_loss_fn(cfg, over):
    model = heads.RewardModel(cfg)

    def loss_fn(params, batch):
        chosen, rejected = mean_rewards(model, params, batch, over)
        return LossOutput(jnp.sum(-jax.nn.log_sigmoid(chosen - rejected)),
                          jnp.asarray(chosen.shape[0], jnp.float32), {}, "num_pairs")
    return loss_fn


def implicit_rewards(cfg, reference, params, batch, per_token=False):
    """(r_chosen, r_rejected) = log pi(y|x) - log pi_ref(y|x) with pi started from and
    pi_ref frozen at the SFT weights: DPO's implicit reward model, trained here with the same
    pairwise loss on the same pairs (beta 0.1) — a reward that reads the language model's own
    likelihood of each token instead of one scalar head at the last one."""
    ref_chosen, ref_rejected = pair_logprobs(cfg, reference, batch)
    chosen, rejected = pair_logprobs(cfg, params, batch)
    if per_token:  # the log-ratio per response token: padding no longer adds up
        chosen_tokens, rejected_tokens = (jnp.maximum(jnp.sum(
            batch[f"{side}_response_mask"][:, 1:], axis=-1), 1) for side in ("chosen", "rejected"))
        return (chosen - ref_chosen) / chosen_tokens, (rejected - ref_rejected) / rejected_tokens
    return chosen - ref_chosen, rejected - ref_rejected


def implicit_loss_fn(cfg, reference, beta=0.1, per_token=False):
    def loss_fn(params, batch):
        chosen, rejected = implicit_rewards(cfg, reference, params, batch, per_token)
        return LossOutput(jnp.sum(-jax.nn.log_sigmoid(beta * (chosen - rejected))),
                          jnp.asarray(chosen.shape[0], jnp.float32), {}, "num_pairs")
    return loss_fn


def train_reward(size, cfg, sft_params, lr, args, paths, vocab, log):
    """One reward-model run from the SFT weights, scored on every held-out pair at each of
    --rm_steps."""
    rm_steps = sorted(int(s) for s in args.rm_steps.split(",") if s)
    train = PairsData([train_pairs_file(paths["pairs_train"], args.rm_pairs, args.workdir)],
                      seq_len=args.seq_len, batch_size=args.rm_batch,
                      vocabulary=vocab, system=args.system)
    valid = PairsData([paths["pairs_valid"]], seq_len=args.seq_len, batch_size=1,
                      vocabulary=vocab, system=args.system)
    kinds, details = pair_groups(valid.pairs)
    model = heads.RewardModel(cfg)
    rm_params = heads.reward_params_from_trunk(sft_params, cfg, jax.random.key(0))
    if args.rm_readout == "last":
        score, loss_fn = jax.jit(lambda p, b: pair_rewards(model, p, b)), reward_loss_fn(cfg)
    elif args.rm_readout.startswith("implicit"):
        rm_params, per_token = sft_params, args.rm_readout == "implicit_per_token"
        score = jax.jit(lambda p, b: implicit_rewards(cfg, sft_params, p, b, per_token))
        loss_fn = implicit_loss_fn(cfg, sft_params, beta=1.0 if per_token else 0.1,
                                   per_token=per_token)
    else:
        over = "response" if args.rm_readout == "response_mean" else "all"
        score = jax.jit(lambda p, b: mean_rewards(model, p, b, over))
        loss_fn = mean_readout_loss_fn(cfg, over)
    rm_tx, _ = OptimizerConfig(learning_rate=lr, warmup_steps=15).build(rm_steps[-1])
    rm_step = make_step(loss_fn, rm_tx)
    rm_opt = rm_tx.init(rm_params)
    batches, began = train.batches(0), time.perf_counter()
    for i in range(1, rm_steps[-1] + 1):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        rm_params, rm_opt, loss = rm_step(rm_params, rm_opt, batch)
        if i in rm_steps:
            acc, by_kind, by_detail = pair_accuracy(score, rm_params, valid, kinds, details)
            log({"stage": "reward", "size": size, "sft_steps": args.sft_steps.split(",")[-1],
                 "lr": lr, "batch": args.rm_batch, "pairs": args.rm_pairs,
                 "readout": args.rm_readout, "steps": i, "loss": round(float(loss), 4),
                 "accuracy": round(acc, 3), "by_kind": by_kind,
                 "correct_vs_wrong": {k: v for k, v in by_detail.items() if "/" in k},
                 "train_s": round(time.perf_counter() - began, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64x2,128x4", help="HIDDENxLAYERS, comma-separated")
    parser.add_argument("--sft_steps", default="250,500,1000,2000")
    parser.add_argument("--rm_steps", default="150,300")
    parser.add_argument("--lr", type=float, default=None,
                        help="SFT peak learning rate (default: 3e-3 at hidden 64, else 1e-3)")
    parser.add_argument("--rm_lr", default="3e-4",
                        help="reward-model peak learning rates, comma-separated: a run each")
    parser.add_argument("--rm_pairs", default="all",
                        choices=("all", "correct_vs_wrong", "as_long"),
                        help="the suite's train pairs the reward model sees (train_pairs_file)")
    parser.add_argument("--rm_readout", default="last",
                        choices=("last", "response_mean", "mean", "implicit",
                                 "implicit_per_token"),
                        help="the score of a sequence: the head at its last token (Xwin's), "
                             "the mean of the head over the response's tokens or over all, "
                             "or DPO's implicit reward, summed or per response token "
                             "(implicit_rewards)")
    parser.add_argument("--rm_batch", type=int, default=16, help="reward-model pairs a step")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--system", default="",
                        help="the chat template's system line ('': none, as the quickstart; "
                             "'xwin': Xwin's)")
    parser.add_argument("--families", default="",
                        help="the suite's families, comma-separated (default: all)")
    parser.add_argument("--num_prompts", type=int, default=6000)
    parser.add_argument("--seq_len", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--workdir", default="/tmp/demo_curves")
    parser.add_argument("--out", default="bench/demo_curves.jsonl")
    args = parser.parse_args()
    args.system = template.XWIN_SYSTEM if args.system == "xwin" else args.system
    paths = synthetic.write_suite(os.path.join(args.workdir, "suite"), seed=0,
                                  num_prompts=args.num_prompts,
                                  families=args.families.split(",") if args.families else None)
    held_out = [json.loads(line)["prompt"] for name in ("prompts_test", "prompts_valid")
                for line in open(paths[name], encoding="utf-8")][:384]
    vocab = ByteVocabulary()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; suite v"
          f"{synthetic.SUITE_VERSION}, {len(held_out)} held-out prompts", flush=True)

    setting = {"suite": f"v{synthetic.SUITE_VERSION}", "families": args.families or "all",
               "system": "xwin" if args.system else "none",
               "rows": f"{args.batch_size}x{args.seq_len}", "prompts": args.num_prompts}
    args.setting_id = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]

    def log(record):
        record = {**setting, **record}
        print(json.dumps(record), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    for size in args.sizes.split(","):
        cfg, params = train_sft(size, args, paths, held_out, vocab, log)
        likelihood_ranking(size, cfg, params, args, paths, vocab, log)
        if args.rm_steps:
            for lr in (float(v) for v in args.rm_lr.split(",")):
                train_reward(size, cfg, params, lr, args, paths, vocab, log)


if __name__ == "__main__":
    main()
