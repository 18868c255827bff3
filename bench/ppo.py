"""One PPO iteration's wall time, split into rollout / scoring / update.

    python bench/ppo.py                                   # CPU: tiny and small58m
    python bench/ppo.py --configs tinyllama --batch 64 --prompt 128 --new 256   # on a GPU
    python bench/ppo.py --mixed --prompt 512 --json out.json  # bucketed vs padded to --prompt

Random policy and reward models of the config (the policy, reference, value and reward model
all resident on the one mesh), random prompts; iterations after the first (which compiles) are
averaged. The peer figure: HF-generate-based PPO trainers (TRL, OpenRLHF without vLLM) spend
80-90% of an iteration in rollout (REFERENCES.md); the goal is below half.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import CONFIGS, on_gpu  # noqa: E402
from xwin_jax.checkpoints.params import save_params  # noqa: E402
from xwin_jax.data import formats  # noqa: E402
from xwin_jax.data.prompts_data import PromptsData  # noqa: E402
from xwin_jax.data.vocabulary import ByteVocabulary  # noqa: E402
from xwin_jax.models import heads, llama  # noqa: E402
from xwin_jax.train import ppo  # noqa: E402

PEER_ROLLOUT_SHARE = (0.80, 0.90)


@dataclasses.dataclass
class RandomPromptsData(PromptsData):
    """Prompts of random ids below `vocab_size`: exactly `max_prompt_len` long, or with
    `mixed`, of lengths drawn from 8..64 (short chat prompts under a long MAX_PROMPT_LEN)."""
    vocab_size: int = 512
    mixed: bool = False

    def _tokenize(self, vocab) -> None:  # when the job binds the policy's vocabulary
        rng = np.random.default_rng(0)
        lengths = rng.integers(8, min(64, self.max_prompt_len) + 1, len(self.prompts)) \
            if self.mixed else [self.max_prompt_len] * len(self.prompts)
        self.ids = [[1] + rng.integers(3, self.vocab_size, n - 1).tolist() for n in lengths]


def run_case(name: str, cfg, batch: int, prompt: int, new: int, iterations: int,
             epochs: int, minibatches: int, mixed: bool = False,
             bucket_multiple: int | None = 64) -> dict:
    with tempfile.TemporaryDirectory() as root:
        save_params(os.path.join(root, "policy"), cfg, llama.init_params(cfg, jax.random.key(0)),
                    vocabulary=ByteVocabulary())
        save_params(os.path.join(root, "rm"), cfg, heads.init_reward_params(
            cfg, jax.random.key(1)), head="score", vocabulary=ByteVocabulary())
        formats.write_jsonl(os.path.join(root, "prompts.jsonl"),
                            [{"prompt": f"p{i}"} for i in range(batch)])
        prompts = RandomPromptsData([os.path.join(root, "prompts.jsonl")],
                                    max_prompt_len=prompt, batch_size=batch,
                                    vocab_size=cfg.vocab_size, mixed=mixed,
                                    bucket_multiple=bucket_multiple)
        # A random policy rarely emits EOS: every rollout runs the full `new` tokens.
        config = ppo.PPOConfig(max_new_tokens=new, epochs=epochs, num_minibatches=minibatches)
        ppo.train_ppo(root, cfg, iterations, prompts, policy_dir=os.path.join(root, "policy"),
                      reward_dir=os.path.join(root, "rm"), ppo=config, checkpoint_every=0,
                      time_phases=True)
        with open(os.path.join(root, "ppo", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if "train/loss" in line][1:]
    mean = lambda key: float(np.mean([r[f"train/{key}"] for r in records]))  # noqa: E731
    result = {k: mean(k) for k in ("time_rollout_s", "time_scoring_s", "time_update_s",
                                   "response_length", "step_time_s")}
    result["rollout_fraction"] = result["time_rollout_s"] / sum(
        result[k] for k in ("time_rollout_s", "time_scoring_s", "time_update_s"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,small58m")
    parser.add_argument("--batch", type=int, default=None, help="default 64 (GPU), 16 (CPU)")
    parser.add_argument("--prompt", type=int, default=None, help="default 128 (GPU), 64 (CPU)")
    parser.add_argument("--new", type=int, default=None, help="default 256 (GPU), 64 (CPU)")
    parser.add_argument("--iterations", type=int, default=3, help="the first one compiles")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--mixed", action="store_true",
                        help="prompts of 8..64 tokens: each config bucketed (to a multiple of "
                             "64) and padded to --prompt, side by side")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    gpu = on_gpu()
    batch = args.batch or (64 if gpu else 16)
    prompt = args.prompt or (128 if gpu else 64)
    new = args.new or (256 if gpu else 64)
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"PPO iteration: {batch} prompts x {prompt} tokens, {new} new tokens, "
          f"{args.epochs} epochs x {args.minibatches} minibatches")
    print(f"{'config':<10} {'rollout s':>10} {'scoring s':>10} {'update s':>9} "
          f"{'rollout share':>14} {'peer share':>11}")
    results = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name].replace(dtype="bfloat16" if gpu else "float32")
        cases = [("bucketed", 64), ("padded", None)] if args.mixed else [("", 64)]
        for how, multiple in cases:
            r = run_case(name, cfg, batch, prompt, new, args.iterations, args.epochs,
                         args.minibatches, mixed=args.mixed, bucket_multiple=multiple)
            results.append(dict(r, config=name, prompts=how or "fixed"))
            label = f"{name} {how}".strip()
            print(f"{label:<10} {r['time_rollout_s']:>10.3f} {r['time_scoring_s']:>10.3f} "
                  f"{r['time_update_s']:>9.3f} {r['rollout_fraction']:>14.1%} "
                  f"{PEER_ROLLOUT_SHARE[0]:>5.0%}-{PEER_ROLLOUT_SHARE[1]:.0%}   "
                  f"(response length {r['response_length']:.0f}, iteration "
                  f"{r['step_time_s']:.3f} s)")
        if args.mixed:
            bucketed, padded = results[-2:]
            speedup = padded["step_time_s"] / bucketed["step_time_s"]
            print(f"{name}: bucketed iteration {speedup:.2f}x faster than padded to {prompt}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
