"""The Xwin-Pair job: n responses per prompt from a policy, pairs judged, preference pairs out.

    python -m xwin_jax.launch --gin_file=gin/models/tiny.gin --gin_file=gin/runs/annotate.gin \
        --gin.CKPT_DIR="'/runs/x/sft/final'" --gin.PROMPTS="'prompts.jsonl'" \
        --gin.OUTPUT_DIR="'/runs/x/annotate'" [--gin.JUDGE="@judge.OpenAIJudge()"]

OUTPUT_DIR is the 'annotate' stage (train/stage.py): its fingerprint is the prompts file's
contents, the policy checkpoint's (by content), the vocabulary (None: the one the checkpoint
records), the judge's fingerprint() (its model, sampling settings and prompt — never its key
or endpoint), the sampling settings and the seed. A rerun of a finished job skips it; one
that changed any of these is refused naming it, or with --gin.jobs.run.overwrite=True starts
over. Responses come from nested generate stages (OUTPUT_DIR/responses_k/, seed + k,
resumable). Each pair is shown to the judge in an order drawn from a hash of its content
(recorded as `swapped`), and every verdict is appended (and synced) at once to
OUTPUT_DIR/judge_cache.jsonl, keyed by (prompt, responses, judge model, judge-prompt
version): a killed run resumes without paying twice or duplicating, and writes the same
pairs file byte for byte.

A pair whose replies held no usable verdict (annotate/judge.py: asked twice) is *unjudged*: it
is not cached, not in pairs.jsonl, counted in summary.json (`unjudged`), listed in
OUTPUT_DIR/unjudged.jsonl (rewritten each run: key, prompt excerpt, problem, an excerpt of
the last reply) and named in the job's closing lines; a rerun of the same command reopens the
finished stage and asks the judge again, for those pairs only. What the judge wrote (reasons,
reply excerpts) passes through `redaction.redact_text` before it is stored, so a reply that
echoes a credential does not put it in a file. A judge that is unreachable or refuses stops
the job with a JudgeError that says how many pairs are cached; the same command resumes.

On N hosts (`--multihost`) every host samples (the generate stages are multi-host), and the
judging happens once, on host 0: it alone calls the judge and writes the cache, pairs.jsonl
and unjudged.jsonl, then OUTPUT_DIR/host0_result.json (its summary, or its error); the other
hosts wait for it (`on_host_zero`) and return that summary (or raise that error).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax

from xwin_jax import fingerprint, jobs
from xwin_jax.annotate.judge import JUDGE_PROMPT_VERSION, JudgeError, judged_prompt, \
    multiturn_digest, render_prompt
from xwin_jax.annotate.cached_calls import judge_cached
from xwin_jax.data import formats
from xwin_jax.decoding import DecodeLayout
from xwin_jax.errors import ConfigError, UserError
from xwin_jax.generate import generate_job, load_outputs
from xwin_jax.models.config import LlamaConfig
from xwin_jax.partitioning import Partitioner, sync_hosts
from xwin_jax.redaction import redact_text
from xwin_jax.train.sharded import Start
from xwin_jax.train.stage import read_json, run_stage, write_json

CACHE_FILE = "judge_cache.jsonl"
PAIRS_FILE = "pairs.jsonl"
UNJUDGED_FILE = "unjudged.jsonl"
HOST_ZERO_FILE = "host0_result.json"  # on N hosts: what host 0's judging returned
EXCERPT_CHARS = 300


def on_host_zero(path: str, fn: Callable[[], Any]) -> Any:
    """fn(), run once for all hosts: what must happen once (judge calls, their cache, the
    files they write). On one host, just fn(). On N hosts host 0 runs it and writes what it
    returned (JSON) — or the error it raised — to `path`; every host waits for that
    (sync_hosts), then returns the value read back from `path`, or raises the error (a
    JudgeError or UserError stays one, so launch prints it the same on every host)."""
    if jax.process_count() == 1:
        return fn()
    barrier = f"on host 0: {os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
    if jax.process_index() == 0:
        try:
            outcome = {"result": fn()}
            write_json(path, outcome)
        except BaseException as err:  # SIGTERM / ^C too: the other hosts must not wait
            try:
                write_json(path, {"error": type(err).__name__, "message": str(err),
                                  "hint": getattr(err, "hint", None),
                                  "user_error": isinstance(err, UserError)})
            finally:
                sync_hosts(barrier)  # the other hosts raise it too
            raise
    sync_hosts(barrier)
    outcome = read_json(path)
    if "error" in outcome:
        message = f"on host 0: {outcome['message']}"
        if outcome["error"] == JudgeError.__name__:
            raise JudgeError(message, hint=outcome["hint"])
        if outcome["user_error"]:
            raise UserError(message, hint=outcome["hint"])
        raise RuntimeError(f"{message} ({outcome['error']}; see host 0's log)")
    return outcome["result"]


class JudgedPairs(NamedTuple):
    """What `judge_pairs` returns: a verdict per item (None where unjudged) and one record
    per unjudged item ({"index", "key", "prompt", "problem", "replies", "reply"})."""
    verdicts: list[dict | None]
    unjudged: list[dict]


def cache_key(prompt: str | formats.Conversation, response_a: str, response_b: str,
              judge_model: str) -> str:
    """The key of a verdict in the cache: what the judge is shown and who judges. A
    single-turn prompt (a str, or a Conversation of one user turn) has the key it has always
    had (caches written before multi-turn prompts stay valid); a multi-turn one covers every
    user and assistant turn (annotate/judge.py: the system message is not shown) and how
    the multi-turn template shows them (judge.multiturn_digest)."""
    prompt = judged_prompt(prompt)
    if isinstance(prompt, str):
        payload = [prompt, response_a, response_b, judge_model, JUDGE_PROMPT_VERSION]
    else:
        payload = [formats.messages_to_json(prompt.turns), response_a, response_b, judge_model,
                   JUDGE_PROMPT_VERSION, multiturn_digest()]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def read_cache(path: str) -> dict[str, dict]:
    """Cached verdicts by key; a line cut off by a kill is dropped (its pair is judged
    again)."""
    return formats.read_appended_jsonl(path, "key")


def excerpt(text: str | formats.Conversation, limit: int = EXCERPT_CHARS) -> str:
    """`text`, or its first `limit` characters and how long it was. A multi-turn prompt (a
    Conversation): the excerpt of its last user message, and how many turns came before."""
    if isinstance(text, formats.Conversation):
        earlier = len(text.turns) - 1
        return (f"{excerpt(text.messages[-1].content, limit)} [after {earlier} earlier "
                f"turn{'' if earlier == 1 else 's'}]")
    return text if len(text) <= limit else f"{text[:limit]}… [{len(text)} characters]"


def _unswap(verdict: dict) -> dict:
    better = {"A": "B", "B": "A"}.get(verdict["better"], "tie")
    return {"better": better, "rating_a": verdict["rating_b"], "rating_b": verdict["rating_a"],
            "reason": verdict["reason"]}


def judge_pairs(items: Sequence[tuple[str, str, str]], judge: Any, cache_path: str,
                concurrency: int = 8, swaps: Sequence[bool] | None = None) -> JudgedPairs:
    """Verdicts (in the items' own A/B order) for (prompt, response_a, response_b) items,
    from the cache where present, else from the judge, `concurrency` calls at a time. The
    judge sees B first where `swaps` says so (default: drawn from a hash of the item).

    An item whose replies held no usable verdict (the judge raised UnusableReply) gets None
    and a record in `unjudged`; it is not cached. A JudgeError (refused, unreachable) stops
    the work: requests in flight finish (and are cached), the rest are not sent, and the
    error says how many items are cached (annotate/cached_calls.py: judge_cached)."""
    keys = [cache_key(p, a, b, judge.model) for p, a, b in items]
    swapped = [(int(k[:8], 16) % 2 == 1) if swaps is None else bool(swaps[i])
               for i, k in enumerate(keys)]

    def judge_one(index: int) -> dict:
        prompt, a, b = items[index]
        verdict = judge.compare(prompt, b, a) if swapped[index] else judge.compare(prompt, a, b)
        # A judge that echoes a credential (a proxy's header, a leaked key) does not get it
        # written: the reason is stored as launch prints it.
        verdict = {**verdict, "reason": redact_text(str(verdict.get("reason", "")))}
        return {"swapped": swapped[index],
                "verdict": _unswap(verdict) if swapped[index] else verdict}

    done = judge_cached(keys, judge_one, cache_path, concurrency=concurrency,
                        stop_event=getattr(judge, "stop_event", None), what="pairs")
    unjudged = [{"index": i, "key": keys[i], "prompt": excerpt(items[i][0]),
                 "swapped": swapped[i], "problem": redact_text(err.problem),
                 "replies": err.replies, "reply": excerpt(redact_text(err.reply))}
                for i, err in done.unusable.items()]
    return JudgedPairs([r["verdict"] if r else None for r in done.records], unjudged)


def write_unjudged(path: str, records: Sequence[dict]) -> None:
    """OUTPUT_DIR/unjudged.jsonl, rewritten (an empty file when every pair was judged), by
    host 0."""
    if jax.process_index() == 0:
        formats.write_jsonl(path, list(records))


def unjudged_line(job: str, count: int, what: str, path: str) -> str:
    """The job's closing line about unjudged items."""
    return (f"[{job}] {count} {what}{'' if count == 1 else 's'} unjudged (see {path}); "
            "rerun the same command to ask the judge again for those only")


def pair_items(prompts: Sequence[formats.Prompt], responses: Sequence[Sequence[str]]
               ) -> tuple[list[tuple[str | formats.Conversation, str, str]], list[int]]:
    """(prompt, a, b) items from responses[k][i] (k-th response to prompt i), pairing 0-1,
    2-3, ...; identical answers are skipped (a tie: nothing to learn, nothing to pay). Also
    the prompt index of each item. The prompt is what the judge is shown
    (judge.judged_prompt): the text of a single-turn prompt, the Conversation of a multi-turn
    one (the judge sees its earlier turns; its cache key covers them)."""
    items, owners = [], []
    for i, prompt in enumerate(prompts):
        judged = judged_prompt(prompt.conversation)
        for k in range(0, len(responses) - 1, 2):
            a, b = responses[k][i], responses[k + 1][i]
            if a != b:
                items.append((judged, a, b))
                owners.append(i)
    return items, owners


def annotate_responses(prompts: Sequence[formats.Prompt], responses: Sequence[Sequence[str]],
                       output_dir: str, judge: Any, *, concurrency: int = 8,
                       usd_per_1k_prompt_tokens: float = 0.03,
                       usd_per_1k_completion_tokens: float = 0.06) -> dict:
    """Judges the pairs of `responses` (see pair_items) and writes OUTPUT_DIR/pairs.jsonl
    (prompt, chosen, rejected, ratings; ties and unjudged pairs left out) and unjudged.jsonl;
    returns the summary (what the annotate stage records in summary.json). It calls the
    judge and writes files: on N hosts, call it on host 0 only (annotate_job: on_host_zero)."""
    os.makedirs(output_dir, exist_ok=True)
    items, owners = pair_items(prompts, responses)
    judged = judge_pairs(items, judge, os.path.join(output_dir, CACHE_FILE), concurrency)
    pairs, ties = [], 0
    for (_, a, b), owner, verdict in zip(items, owners, judged.verdicts):
        if verdict is None:
            continue
        if verdict["better"] == "tie":
            ties += 1
            continue
        a_wins = verdict["better"] == "A"
        # pairs.jsonl's `prompt`: the text of a lone user message, else the conversation.
        pairs.append({"prompt": formats.prompt_to_json(prompts[owner].conversation),
                      "chosen": a if a_wins else b, "rejected": b if a_wins else a,
                      "chosen_rating": verdict["rating_a"] if a_wins else verdict["rating_b"],
                      "rejected_rating": verdict["rating_b"] if a_wins else verdict["rating_a"]})
    pairs_path = os.path.join(output_dir, PAIRS_FILE)
    unjudged_path = os.path.join(output_dir, UNJUDGED_FILE)
    formats.write_jsonl(pairs_path, pairs)
    write_unjudged(unjudged_path, [{"prompt_index": owners[r["index"]], **r}
                                   for r in judged.unjudged])
    usage = dict(judge.usage)
    cost = (usage.get("prompt_tokens", 0) * usd_per_1k_prompt_tokens
            + usage.get("completion_tokens", 0) * usd_per_1k_completion_tokens) / 1000
    unjudged = sum(v is None for v in judged.verdicts)
    summary = {"prompts": len(prompts), "pairs_to_judge": len(items),
               "judged": len(items) - unjudged, "unjudged": unjudged, "pairs": len(pairs),
               "ties": ties, "judge": judge.model, "judge_usage_this_run": usage,
               "estimated_cost_usd_this_run": round(cost, 4), "pairs_file": pairs_path,
               "unjudged_file": unjudged_path}
    if unjudged:  # the same command asks the judge again, for these only
        summary["incomplete"] = f"{unjudged} pair{'' if unjudged == 1 else 's'} unjudged"
    print(f"[annotate] {len(pairs)} pairs ({ties} ties) from {len(prompts)} prompts → "
          f"{pairs_path}")
    if unjudged:
        print(unjudged_line("annotate", unjudged, "pair", unjudged_path))
    return summary


def annotate_job(prompts_path: str, output_dir: str, model: LlamaConfig, judge: Any, *,
                 ckpt_dir: str, vocabulary: Any = None, num_responses: int = 2,
                 temperature: float = 0.7, top_k: int = 0, top_p: float = 1.0,
                 max_new_tokens: int = 256, max_prompt_len: int = 1024,
                 system: str | None = None, batch_size: int = 16, concurrency: int = 8,
                 seed: int = 0, dry_run: bool = False, usd_per_1k_prompt_tokens: float = 0.03,
                 usd_per_1k_completion_tokens: float = 0.06,
                 partitioner: Partitioner | None = None,
                 decode_layout: DecodeLayout | None = None) -> dict:
    """The Xwin-Pair job: samples `num_responses` answers per prompt from the policy in
    `ckpt_dir` (a generate stage each, OUTPUT_DIR/responses_k, seed + k, the policy in
    `decode_layout`), then `annotate_responses` (on host 0). OUTPUT_DIR is the 'annotate'
    stage (train/stage.py): its fingerprint is the prompts' contents, the policy checkpoint,
    the vocabulary (None: the checkpoint's), the judge, the sampling settings and the seed.
    `dry_run`: sample, print one rendered judge prompt and stop, paying nothing and finishing
    nothing."""
    if num_responses < 2:
        raise ConfigError(f"num_responses={num_responses}: a pair needs at least 2")
    prompts = formats.read_prompts(prompts_path).records
    policy = Start.policy(model, ckpt_dir, vocabulary, what="CKPT_DIR")
    sampling_settings = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                             max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len,
                             system=system)

    def sample(stage_dir: str) -> list[list[str]]:
        responses = []
        for k in range(num_responses):
            directory = os.path.join(stage_dir, f"responses_{k}")
            generate_job(prompts_path, directory, model, ckpt_dir=ckpt_dir,
                         vocabulary=policy.vocabulary, generator=f"policy_sample_{k}",
                         batch_size=batch_size, seed=seed + k, partitioner=partitioner,
                         decode_layout=decode_layout, **sampling_settings)
            responses.append([r["output"] for r in load_outputs(directory)])
        return responses

    if dry_run:
        jobs.write_config(output_dir, finished=False)
        items, _ = pair_items(prompts, sample(output_dir))
        if items and jax.process_index() == 0:
            print(render_prompt(*items[0]))
        return {"pairs_to_judge": len(items), "dry_run": True}
    settings = {"prompts": fingerprint.file_identity(prompts_path),
                "checkpoint": policy.checkpoint, "model": policy.config,
                "vocabulary": policy.vocabulary, "judge": judge,
                "num_responses": num_responses, **sampling_settings, "seed": seed}

    def body(stage_dir: str) -> dict:
        responses = sample(stage_dir)  # on every host
        return on_host_zero(os.path.join(stage_dir, HOST_ZERO_FILE), lambda: annotate_responses(
            prompts, responses, stage_dir, judge, concurrency=concurrency,
            usd_per_1k_prompt_tokens=usd_per_1k_prompt_tokens,
            usd_per_1k_completion_tokens=usd_per_1k_completion_tokens))

    return run_stage(output_dir, "annotate", settings, body)
