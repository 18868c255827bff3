"""How far the offline demo's models get on the synthetic suite: SFT held-out task accuracy by
family, and the reward model's held-out pair accuracy by pair kind, against model size and
training steps (issue 18: what it takes for correctness, not length, to be learnable).

    python bench/demo_curves.py                       # the quickstart's tiny model, then 0.87M
    python bench/demo_curves.py --sizes 64x2 --sft_steps 250,500 --rm_steps 150
    python bench/demo_curves.py --sizes 64x2 --system '' --seq_len 256 --batch_size 16 \
        --families copy,uppercase,first_letter,last_letter --rm_steps ''

Each size is one SFT run on the suite (by default all its families, 6000 prompts, the
quickstart's template without a system line, 12 × 320 packed rows; --system, --families,
--num_prompts, --seq_len and --batch_size change them), AdamW with cosine decay over the
longest step count, its held-out accuracy measured at each requested step by sampling the
quickstart's 384 held-out prompts at temperature 0.7 (and greedily). From the SFT weights at
the last step, one reward-model run on the suite's train pairs (16 pairs a step), scored on
every held-out pair at each requested step, by kind (synthetic.pair_kind). One JSON line per
measurement goes to --out; the table is printed at the end. Not a test: nothing here gates CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xwin_jax import sampling  # noqa: E402
from xwin_jax.data import converters, formats, synthetic, template  # noqa: E402
from xwin_jax.data.pairs_data import PairsData  # noqa: E402
from xwin_jax.data.sft_data import SftData  # noqa: E402
from xwin_jax.data.vocabulary import ByteVocabulary  # noqa: E402
from xwin_jax.models import heads  # noqa: E402
from xwin_jax.models.config import preset  # noqa: E402
from xwin_jax.models.llama import init_params  # noqa: E402
from xwin_jax.train.reward import pair_rewards, reward_loss_fn  # noqa: E402
from xwin_jax.train.sft import sft_loss_fn  # noqa: E402
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


def pair_accuracy(score, params, pairs_data, kinds, batch=16):
    """(overall accuracy, {kind: (accuracy, pairs)}) over every held-out pair."""
    arrays, n = pairs_data.arrays, pairs_data.num_pairs
    correct = []
    for first in range(0, n, batch):
        rows = np.minimum(np.arange(first, first + batch), n - 1)
        chosen, rejected = score(params, {k: v[rows] for k, v in arrays.items()})
        correct += list(np.asarray(chosen > rejected)[:min(batch, n - first)])
    correct = np.asarray(correct)
    by_kind = {k: (round(float(correct[kinds == k].mean()), 3), int((kinds == k).sum()))
               for k in synthetic.PAIR_KINDS if (kinds == k).any()}
    return float(correct.mean()), by_kind


def run_size(size, args, paths, held_out, vocab, log):
    cfg = model_config(size)
    lr = args.lr or (3e-3 if cfg.hidden_size <= 64 else 1e-3)
    sft_steps = sorted(int(s) for s in args.sft_steps.split(","))
    data = SftData([paths["sft_train"]], seq_len=args.seq_len, batch_size=args.batch_size,
                   vocabulary=vocab, system=args.system)
    tx, _ = OptimizerConfig(learning_rate=lr, warmup_steps=20).build(sft_steps[-1])
    step = make_step(sft_loss_fn(cfg), tx)
    params = init_params(cfg, jax.random.key(0))
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
    rm_steps = sorted(int(s) for s in args.rm_steps.split(",") if s)
    if not rm_steps:
        return
    train = PairsData([paths["pairs_train"]], seq_len=args.seq_len, batch_size=16,
                      vocabulary=vocab, system=args.system)
    valid = PairsData([paths["pairs_valid"]], seq_len=args.seq_len, batch_size=1,
                      vocabulary=vocab, system=args.system)
    kinds = np.asarray([synthetic.pair_kind(p.prompt.messages if len(p.prompt.messages) > 1
                                            else p.prompt.messages[0].content,
                                            p.chosen, p.rejected) for p in valid.pairs])
    model = heads.RewardModel(cfg)
    score = jax.jit(lambda p, b: pair_rewards(model, p, b))
    rm_params = heads.reward_params_from_trunk(params, cfg, jax.random.key(0))
    rm_tx, _ = OptimizerConfig(learning_rate=3e-4, warmup_steps=15).build(rm_steps[-1])
    rm_step = make_step(reward_loss_fn(cfg), rm_tx)
    rm_opt = rm_tx.init(rm_params)
    batches, began = train.batches(0), time.perf_counter()
    for i in range(1, rm_steps[-1] + 1):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        rm_params, rm_opt, loss = rm_step(rm_params, rm_opt, batch)
        if i in rm_steps:
            acc, by_kind = pair_accuracy(score, rm_params, valid, kinds)
            log({"stage": "reward", "size": size, "sft_steps": sft_steps[-1], "steps": i,
                 "loss": round(float(loss), 4), "accuracy": round(acc, 3), "by_kind": by_kind,
                 "train_s": round(time.perf_counter() - began, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64x2,128x4", help="HIDDENxLAYERS, comma-separated")
    parser.add_argument("--sft_steps", default="250,500,1000,2000")
    parser.add_argument("--rm_steps", default="150,300")
    parser.add_argument("--lr", type=float, default=None,
                        help="SFT peak learning rate (default: 3e-3 at hidden 64, else 1e-3)")
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

    def log(record):
        record = {**setting, **record}
        print(json.dumps(record), flush=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    for size in args.sizes.split(","):
        run_size(size, args, paths, held_out, vocab, log)


if __name__ == "__main__":
    main()
