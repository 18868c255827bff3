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

class FakeJudge:
    """Scripted verdicts (the shorter answer wins by 5) and, for the first calls, faults."""

    def __init__(self, faults):
        self.faults = list(faults)
        self.calls = 0
        self.lock = threading.Lock()

    def app(self):
        import asyncio

        import fastapi
        from fastapi.responses import JSONResponse

        app = fastapi.FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict):
            with self.lock:
                self.calls += 1
                fault = self.faults.pop(0) if self.faults else None
            if fault == "429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                    headers={"retry-after": "0"})
            if fault == "500":
                return JSONResponse({"error": {"message": "boom"}}, status_code=500)
            if fault == "timeout":
                await asyncio.sleep(1.5)
            text = body["messages"][-1]["content"]
            a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.DOTALL).group(1)
            b = re.search(r"\[Answer B\]\n(.*?)\n\nWhich answer", text, re.DOTALL).group(1)
            better = "A" if len(a) < len(b) else "B"
            content = json.dumps({"better": better, "rating_a": 9 if better == "A" else 4,
                                  "rating_b": 9 if better == "B" else 4, "reason": "shorter"})
            finish = "stop"
            if fault == "malformed":
                content = '{"better": "A", "rating_a": 9,'
            if fault == "truncated":
                content, finish = content[:20], "length"
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                              "total_tokens": 120}}

        return app


@pytest.fixture
def fake_judge():
    import uvicorn

    servers = []

    def start(faults):
        fake = FakeJudge(faults)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=port,
                                               log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        servers.append(server)
        from xwin_jax.annotate import judge as judge_lib
        judge = judge_lib.OpenAIJudge(model="fake-gpt-4", base_url=f"http://127.0.0.1:{port}/v1",
                                      api_key="sk-secret-test", timeout_s=0.5, backoff_s=0.01)
        return fake, judge

    yield start
    for server in servers:
        server.should_exit = True
