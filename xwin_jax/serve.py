"""An OpenAI-compatible HTTP server over a checkpoint.

    python -m xwin_jax.launch --gin_file=gin/models/tiny.gin --gin_file=gin/runs/serve.gin \
        --gin.CKPT_DIR="'/runs/x/sft/final'" [--gin.PORT=8000]

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="xwin_jax", messages=[{"role": "user", ...}])

POST /v1/chat/completions (the Xwin chat template), POST /v1/completions (raw text after BOS),
GET /v1/models. Binds 127.0.0.1 unless told otherwise. Concurrent requests are batched: a
worker thread takes whatever requests are waiting (up to max_batch_size, grouped by sampling
settings) and decodes them together in one jitted call, each row with its own request's seed
(a random one when the request gives none). Malformed requests get HTTP 400 with
an OpenAI-style error body. Streaming is not supported (a request asking for it gets a 400).

FastAPI + uvicorn: maintained, ASGI (many concurrent connections on one event loop while the
accelerator works in a thread), and pydantic validates request bodies, which gives exact
400s for free.
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Literal

import jax
import numpy as np
import pydantic

from xwin_jax import sampling
from xwin_jax.data import converters, template
from xwin_jax.data.formats import ASSISTANT, SYSTEM, USER, Conversation, Message
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.generate import load_model
from xwin_jax.models.config import LlamaConfig

PAD_MULTIPLE = 64


class ChatMessage(pydantic.BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(pydantic.BaseModel):
    model: str | None = None
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
    n: int = pydantic.Field(default=1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**31 - 1)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = pydantic.Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    future: Future


class BatchingGenerator:
    """A worker thread that decodes waiting requests together."""

    def __init__(self, params, cfg: LlamaConfig, vocab, max_batch_size: int = 8,
                 max_prompt_len: int = 1024, max_tokens_limit: int = 1024):
        self.params, self.cfg, self.vocab = params, cfg, vocab
        self.max_batch_size, self.max_prompt_len = max_batch_size, max_prompt_len
        self.max_tokens_limit = max_tokens_limit
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="generator")
        self._thread.start()
        self.batches_run = 0

    def submit(self, prompt_ids, max_tokens, temperature, top_p, seed,
               prompt_param: str = "messages") -> Future:
        """Queues a request after checking what could otherwise fail its whole batch."""
        if len(prompt_ids) > self.max_prompt_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the limit is "
                               f"{self.max_prompt_len}", prompt_param)
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"max_tokens={max_tokens} is over this server's limit of "
                               f"{self.max_tokens_limit}", "max_tokens")
        future: Future = Future()
        self._queue.put(_Job(prompt_ids, max_tokens, temperature, top_p, seed, future))
        return future

    def _run(self):
        while True:
            jobs = [self._queue.get()]
            time.sleep(0.005)  # let requests that arrive together share the batch
            while len(jobs) < 4 * self.max_batch_size:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.temperature, job.top_p), []).append(job)
            for (temperature, top_p), group in groups.items():
                for start in range(0, len(group), self.max_batch_size):
                    self._decode(group[start:start + self.max_batch_size], temperature, top_p)

    def _decode(self, jobs: list[_Job], temperature: float, top_p: float):
        try:  # requests were checked at submit; anything failing here fails its batch (500)
            padded = jobs + [jobs[-1]] * (self.max_batch_size - len(jobs))  # one batch shape
            rows = [job.prompt_ids for job in padded]
            width = -(-max(map(len, rows)) // PAD_MULTIPLE) * PAD_MULTIPLE
            batch = converters.left_padded_batch(rows, width, self.vocab.pad_id)
            budget = -(-max(job.max_tokens for job in jobs) // 16) * 16  # few compiled lengths
            # Each request samples with its own seed, whoever shares its batch.
            keys = jax.vmap(jax.random.key)(np.asarray([job.seed for job in padded], np.uint32))
            result = sampling.generate(
                self.params, self.cfg, batch["tokens"], batch["mask"], keys,
                max_new_tokens=budget, temperature=temperature,
                top_p=top_p, stop_ids=(self.vocab.eos_id,), pad_id=self.vocab.pad_id)
            self.batches_run += 1
            for r, job in enumerate(jobs):
                n = int(result.lengths[r])
                stopped = bool(result.finished[r]) and n <= job.max_tokens
                ids = result.tokens[r, :min(n - 1 if stopped else n, job.max_tokens)]
                job.future.set_result((ids.tolist(), "stop" if stopped else "length"))
        except Exception as err:  # report to every waiting request, keep serving
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)


def _apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def create_app(generator: BatchingGenerator, model_name: str, system: str | None = None,
               default_max_tokens: int = 256):
    import fastapi
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = fastapi.FastAPI(title="xwin_jax", version="1")
    vocab = generator.vocab

    def error(status: int, message: str, param: str | None = None):
        return JSONResponse(status_code=status, content={"error": {
            "message": message, "type": "invalid_request_error", "param": param,
            "code": None}})

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc):
        return error(400, str(exc), exc.param)

    @app.exception_handler(Exception)
    async def on_server_error(request, exc):
        return JSONResponse(status_code=500, content={"error": {
            "message": f"generation failed: {exc}", "type": "server_error", "param": None,
            "code": None}})

    def check(request: SamplingFields):
        if request.stream:
            raise RequestError("streaming is not supported by this server", "stream")
        if request.model not in (None, model_name):
            raise RequestError(f"model {request.model!r} is not served here; this server "
                               f"serves {model_name!r}", "model")

    async def run(prompt_ids, request: SamplingFields, prompt_param: str):
        import asyncio
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        future = generator.submit(prompt_ids, request.max_tokens or default_max_tokens,
                                  request.temperature, request.top_p, seed, prompt_param)
        ids, finish = await asyncio.wrap_future(future)
        text, stopped = _apply_stop(vocab.decode(ids), request.stop)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                 "total_tokens": len(prompt_ids) + len(ids)}
        return text, "stop" if stopped else finish, usage

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "xwin_jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        check(request)
        roles = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
        messages = tuple(Message(roles[m.role], m.content) for m in request.messages)
        try:  # roles must alternate (user first, a system message only first), ending on user
            prompt_ids = template.tokenize_prompt(Conversation(messages, "messages"), vocab,
                                                  system)
        except ValueError as err:
            raise RequestError(str(err), "messages") from None
        text, finish, usage = await run(prompt_ids, request, "messages")
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        check(request)
        prompt_ids = [vocab.bos_id] + vocab.encode(request.prompt)
        text, finish, usage = await run(prompt_ids, request, "prompt")
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish,
                             "logprobs": None}],
                "usage": usage}

    return app


def serve(model: LlamaConfig, *, ckpt_dir: str | None = None, hf_dir: str | None = None,
          vocabulary: str = "bytes", host: str = "127.0.0.1", port: int = 8000,
          model_name: str = "xwin_jax", max_batch_size: int = 8, max_prompt_len: int = 1024,
          default_max_tokens: int = 256, max_tokens_limit: int = 1024,
          system: str | None = None) -> None:
    """The serve job: loads the checkpoint and serves until interrupted."""
    import uvicorn

    cfg, params = load_model(model, ckpt_dir, hf_dir)
    generator = BatchingGenerator(params, cfg, get_vocabulary(vocabulary), max_batch_size,
                                  max_prompt_len, max_tokens_limit)
    app = create_app(generator, model_name, system, default_max_tokens)
    print(f"[serve] {model_name} on http://{host}:{port}/v1 (max batch {max_batch_size})")
    uvicorn.run(app, host=host, port=port, log_level="warning")

