"""Shared fixtures: tiny random HF Llama models written to disk with transformers."""

import os

# Quiet TensorFlow/XLA start-up chatter and keep JAX on the CPU in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight fake CPU devices for the sharding tests; single-device code simply uses the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_hf_model(seed=0, **overrides):
    """A random transformers LlamaForCausalLM whose every weight (norms too) is non-trivial."""
    import torch
    import transformers

    values = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    values.update(overrides)
    config = transformers.LlamaConfig(**values)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            # Random std ~0.15: logits of order 1, so a layout error could not hide in noise.
            param.copy_(torch.randn_like(param) * 0.15 + (1.0 if param.ndim == 1 else 0.0))
    return model


def hf_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.fixture
def hf_model_dir(tmp_path):
    """Writes a tiny random HF model to disk; returns (dir, model)."""
    def write(**overrides):
        model = make_hf_model(**overrides)
        path = tmp_path / "hf"
        model.save_pretrained(path)
        return str(path), model
    return write


# --- a fake OpenAI-compatible judge on loopback (annotation and evaluation tests) ---------

TRAILING_LIST = '\n\n[{"model": "model_1", "rank": 1}, {"model": "model_2", "rank": 2}]'
GARBAGE = "Both answers have their merits; I cannot decide between them."


class FakeJudge:
    """Scripted verdicts (the shorter answer wins by 5) and, for the first calls, faults.

    faults: consumed one per request, in arrival order ("429", "500", "timeout", "401", "400",
    "malformed", "truncated", "truncated_complete", "garbage", "trailing_list", "empty").
    by_prompt: {prompt: [faults]} consumed first by the requests about that prompt.
    style: how a healthy request is answered: "json" (only the verdict), "trailing_list" (the
    verdict, then an AlpacaEval-style ranking list), "prose" (braces in prose around it, a
    JSON object without verdict fields first), "fenced" (``` fences) or "garbage" (no JSON).
    prompt_calls counts the requests per prompt."""

    def __init__(self, faults, by_prompt=None, style="json"):
        self.faults = list(faults)
        self.by_prompt = {k: list(v) for k, v in (by_prompt or {}).items()}
        self.style = style
        self.calls = 0
        self.prompt_calls = {}
        self.lock = threading.Lock()

    def app(self):
        import asyncio

        import fastapi
        from fastapi.responses import JSONResponse

        app = fastapi.FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            text = body["messages"][-1]["content"]
            prompt = re.search(r"\[User request\]\n(.*?)\n\n\[Answer A\]", text,
                               re.DOTALL).group(1)
            with self.lock:
                self.calls += 1
                self.prompt_calls[prompt] = self.prompt_calls.get(prompt, 0) + 1
                own = self.by_prompt.get(prompt)
                if own:
                    fault = own.pop(0)
                else:
                    fault = self.faults.pop(0) if self.faults else None
            if fault == "429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                    headers={"retry-after": "0"})
            if fault == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if fault == "401":
                return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
            if fault == "400":  # what OpenAI answers for a prompt over the model's context
                return JSONResponse({"error": {"message": "maximum context length exceeded",
                                               "code": "context_length_exceeded"}},
                                    status_code=400)
            if fault == "timeout":
                await asyncio.sleep(3.0)  # well past the client timeout below
            a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.DOTALL).group(1)
            b = re.search(r"\[Answer B\]\n(.*?)\n\nWhich answer", text, re.DOTALL).group(1)
            better = "A" if len(a) < len(b) else "B"
            content = json.dumps({"better": better, "rating_a": 9 if better == "A" else 4,
                                  "rating_b": 9 if better == "B" else 4, "reason": "shorter"})
            finish = "stop"
            style = fault if fault in ("trailing_list", "garbage") else self.style
            if style == "trailing_list":
                content += TRAILING_LIST
            elif style == "prose":
                content = (f"Answer B uses {{braces}}; a note {{\"x\": 1}} first. {content} "
                           "Then {more braces}.")
            elif style == "fenced":
                content = f"Here is my verdict:\n```json\n{content}\n```"
            elif style == "garbage":
                content = GARBAGE
            if fault == "malformed":
                content = '{"better": "A", "rating_a": 9,'
            if fault == "truncated":
                content, finish = content[:20], "length"
            if fault == "truncated_complete":  # cut off after the verdict: still usable
                content, finish = content + " Because answer A is", "length"
            choices = [{"index": 0, "finish_reason": finish,
                        "message": {"role": "assistant", "content": content}}]
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [] if fault == "empty" else choices,
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                              "total_tokens": 120}}

        return app


def eos_biased_policy(cfg):
    """A random policy that ends some responses within a few tokens: EOS gets a large bias."""
    import jax

    from xwin_jax.models import llama

    params = llama.init_params(cfg, jax.random.key(0))
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 2].add(0.3)
    return params


def write_policy_and_reward(root, cfg, vocab, stats=(0.1, 2.0)):
    """ROOT/policy (eos_biased_policy) and ROOT/rm (a random reward model, with RewardStats
    `stats` unless None), both recording `vocab`."""
    import jax

    from xwin_jax.checkpoints.params import save_params
    from xwin_jax.models import heads
    from xwin_jax.rewards import RewardStats

    save_params(str(root / "policy"), cfg, eos_biased_policy(cfg), vocabulary=vocab)
    save_params(str(root / "rm"), cfg, heads.init_reward_params(cfg, jax.random.key(1)),
                head="score", vocabulary=vocab)
    if stats is not None:
        RewardStats(*stats).save(str(root / "rm"))


def numpy_response_logprobs(cfg, params, tokens, mask):
    """An independent reference for DPO's sequence log-probs: log-softmax of the full
    logits in float64, summed over the tokens where the response mask is 1 → [B]."""
    from xwin_jax.models import llama

    logits = np.asarray(llama.Llama(cfg).apply({"params": params}, tokens), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return np.array([sum(logp[r, t - 1, tokens[r, t]] for t in range(1, tokens.shape[1])
                         if mask[r, t]) for r in range(tokens.shape[0])])


def serve_on_loopback(app):
    """Starts an ASGI app with uvicorn on a free 127.0.0.1 port in a daemon thread; returns
    (server, port). Set server.should_exit = True to stop it."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, port


@pytest.fixture
def fake_judge():
    servers = []

    def start(faults=(), *, by_prompt=None, style="json", **judge_options):
        """(FakeJudge, OpenAIJudge pointed at it); judge_options override the judge's."""
        fake = FakeJudge(faults, by_prompt, style)
        server, port = serve_on_loopback(fake.app())
        servers.append(server)
        from xwin_jax.annotate import judge as judge_lib
        options = dict(model="fake-gpt-4", base_url=f"http://127.0.0.1:{port}/v1",
                       api_key="sk-secret-test", timeout_s=1.0, backoff_s=0.01)  # 100x a reply
        judge = judge_lib.OpenAIJudge(**{**options, **judge_options})
        return fake, judge

    yield start
    for server in servers:
        server.should_exit = True
