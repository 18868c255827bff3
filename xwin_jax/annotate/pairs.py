"""The Xwin-Pair job: n responses per prompt from a policy, pairs judged, preference pairs out.

    python -m xwin_jax.launch --gin_file=gin/models/tiny.gin --gin_file=gin/runs/annotate.gin \
        --gin.CKPT_DIR="'/runs/x/sft/final'" --gin.PROMPTS="'prompts.jsonl'" \
        --gin.OUTPUT_DIR="'/runs/x/annotate'" [--gin.JUDGE="@judge.OpenAIJudge()"]

Responses come from the generate job (OUTPUT_DIR/responses_k/, resumable). Each pair is shown
to the judge in an order drawn from a hash of its content (recorded as `swapped`), and every
verdict is appended at once to OUTPUT_DIR/judge_cache.jsonl, keyed by (prompt, responses, judge
model, judge-prompt version): a killed run resumes without paying twice or duplicating.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from tqdm import tqdm

from xwin_jax.annotate.judge import JUDGE_PROMPT_VERSION, render_prompt
from xwin_jax.data import formats
from xwin_jax.generate import generate_job, load_outputs
from xwin_jax.models.config import LlamaConfig

CACHE_FILE = "judge_cache.jsonl"
PAIRS_FILE = "pairs.jsonl"


def cache_key(prompt: str, response_a: str, response_b: str, judge_model: str) -> str:
    payload = json.dumps([prompt, response_a, response_b, judge_model, JUDGE_PROMPT_VERSION])
    return hashlib.sha256(payload.encode()).hexdigest()


def read_cache(path: str) -> dict[str, dict]:
    """Cached verdicts by key. A line cut off by a kill is dropped from the file (its pair is
    judged again), so later appends start on a clean line."""
    cache, good, total = {}, [], 0
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                total += 1
                try:
                    record = json.loads(line)
                    cache[record["key"]] = record
                    good.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        if len(good) != total or (good and not open(path, "rb").read().endswith(b"\n")):
            with open(path + ".partial", "w", encoding="utf-8") as f:
                f.writelines(good)
            os.replace(path + ".partial", path)
    return cache


def _unswap(verdict: dict) -> dict:
    better = {"A": "B", "B": "A"}.get(verdict["better"], "tie")
    return {"better": better, "rating_a": verdict["rating_b"], "rating_b": verdict["rating_a"],
            "reason": verdict["reason"]}


def judge_pairs(items: Sequence[tuple[str, str, str]], judge: Any, cache_path: str,
                concurrency: int = 8, swaps: Sequence[bool] | None = None) -> list[dict]:
    """Verdicts (in the items' own A/B order) for (prompt, response_a, response_b) items,
    from the cache where present, else from the judge, `concurrency` calls at a time. The
    judge sees B first where `swaps` says so (default: drawn from a hash of the item)."""
    cache = read_cache(cache_path)
    lock = threading.Lock()
    keys = [cache_key(p, a, b, judge.model) for p, a, b in items]
    todo = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in cache}.values())

    def judge_one(index: int) -> None:
        prompt, a, b = items[index]
        swapped = (int(keys[index][:8], 16) % 2 == 1) if swaps is None else bool(swaps[index])
        verdict = judge.compare(prompt, b, a) if swapped else judge.compare(prompt, a, b)
        record = {"key": keys[index], "swapped": swapped,
                  "verdict": _unswap(verdict) if swapped else verdict}
        with lock:
            cache[keys[index]] = record
            with open(cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    with ThreadPoolExecutor(max(1, concurrency)) as pool, tqdm(
            total=len(items), initial=len(items) - len(todo), desc="judge") as bar:
        for _ in pool.map(judge_one, todo):
            bar.update(1)
    return [cache[k]["verdict"] for k in keys]


def _prompt_field(prompt: formats.Prompt) -> Any:
    messages = prompt.conversation.messages
    return messages[0].content if len(messages) == 1 else formats.messages_to_json(messages)


def annotate_job(prompts_path: str, output_dir: str, model: LlamaConfig, judge: Any, *,
                 ckpt_dir: str | None = None, hf_dir: str | None = None,
                 vocabulary: str = "bytes", num_responses: int = 2, temperature: float = 0.7,
                 top_p: float = 1.0, max_new_tokens: int = 256, batch_size: int = 16,
                 concurrency: int = 8, seed: int = 0, dry_run: bool = False,
                 usd_per_1k_prompt_tokens: float = 0.03,
                 usd_per_1k_completion_tokens: float = 0.06) -> dict:
    """Writes OUTPUT_DIR/pairs.jsonl (prompt, chosen, rejected, ratings; ties left out)."""
    if num_responses < 2:
        raise ValueError(f"num_responses={num_responses}: a pair needs at least 2")
    prompts = formats.read_prompts(prompts_path).records
    responses = []
    for k in range(num_responses):
        directory = os.path.join(output_dir, f"responses_{k}")
        generate_job(prompts_path, directory, model, ckpt_dir=ckpt_dir, hf_dir=hf_dir,
                     vocabulary=vocabulary, generator=f"policy_sample_{k}",
                     batch_size=batch_size, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed + k)
        responses.append([r["output"] for r in load_outputs(directory)])
    items, owners = [], []
    for i, prompt in enumerate(prompts):
        for k in range(0, num_responses - 1, 2):
            a, b = responses[k][i], responses[k + 1][i]
            if a != b:  # identical answers are a tie: nothing to learn, nothing to pay
                items.append((prompt.text, a, b))
                owners.append(i)
    if dry_run:
        if items:
            print(render_prompt(*items[0]))
        return {"pairs_to_judge": len(items), "dry_run": True}
    verdicts = judge_pairs(items, judge, os.path.join(output_dir, CACHE_FILE), concurrency)
    pairs, ties = [], 0
    for (prompt_text, a, b), owner, verdict in zip(items, owners, verdicts):
        if verdict["better"] == "tie":
            ties += 1
            continue
        a_wins = verdict["better"] == "A"
        pairs.append({"prompt": _prompt_field(prompts[owner]),
                      "chosen": a if a_wins else b, "rejected": b if a_wins else a,
                      "chosen_rating": verdict["rating_a"] if a_wins else verdict["rating_b"],
                      "rejected_rating": verdict["rating_b"] if a_wins else verdict["rating_a"]})
    formats.write_jsonl(os.path.join(output_dir, PAIRS_FILE), pairs)
    usage = dict(judge.usage)
    cost = (usage.get("prompt_tokens", 0) * usd_per_1k_prompt_tokens
            + usage.get("completion_tokens", 0) * usd_per_1k_completion_tokens) / 1000
    summary = {"prompts": len(prompts), "judged": len(items), "pairs": len(pairs),
               "ties": ties, "judge": judge.model, "judge_usage_this_run": usage,
               "estimated_cost_usd_this_run": round(cost, 4),
               "pairs_file": os.path.join(output_dir, PAIRS_FILE)}
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[annotate] {len(pairs)} pairs ({ties} ties) from {len(prompts)} prompts → "
          f"{summary['pairs_file']}")
    return summary
