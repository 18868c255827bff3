"""An OpenAI-compatible HTTP server over a checkpoint.

    python -m xwin_jax.launch --gin_file=gin/models/tiny.gin --gin_file=gin/runs/serve.gin \
        --gin.CKPT_DIR="'/runs/x/sft/final'" [--gin.PORT=8000]

CKPT_DIR is a params checkpoint or an HF directory (models/spec.py: open_checkpoint); the
server tokenizes with the vocabulary it records unless VOCABULARY says otherwise.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="xwin_jax", messages=[{"role": "user", ...}])

POST /v1/chat/completions (the Xwin chat template), POST /v1/completions (raw text after BOS),
GET /v1/models. Binds 127.0.0.1 unless told otherwise; writes nothing anywhere.

Concurrent requests are batched (serve_engine.py): one worker decodes whatever is waiting in
one batch, whatever the requests' temperature / top_p / top_k (a vLLM-style extra), each row
with its own request's seed (a random one when the request gives none). `n` choices (up to
max_n) are n rows, choice i sampling with fold_in(key(seed), i). `stream=true` sends
server-sent events in OpenAI's chunk format — a role delta per choice (chat), content deltas
as the decode produces them, a chunk with each choice's finish_reason, a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. Streamed or not, a choice's text is the
same: it ends before the first `stop` string, and streaming holds back text that may still
change (an incomplete UTF-8 character, a tail that could begin a stop string, and — chat
answers being stripped — whitespace that nothing has followed yet).

Requests the server cannot serve as asked get HTTP 400 with an OpenAI-style error body naming
`param`: a prompt over the prompt limit, max_tokens over its limit, prompt + max_tokens over
the model's context (code context_length_exceeded; without max_tokens the default is lowered
to fit the context), n over max_n. A decode that fails answers its requests with HTTP 500
(an error event when streaming) and the server keeps serving.

FastAPI + uvicorn: maintained, ASGI (many concurrent connections on one event loop while the
accelerator works in a thread), and pydantic validates request bodies, which gives exact
400s for free.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Literal, Sequence

import pydantic

from xwin_jax.data import template
from xwin_jax.data.formats import ASSISTANT, SYSTEM, USER, Conversation, Message
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM
from xwin_jax.partitioning import Partitioner
from xwin_jax.train.sharded import Start, frozen_params
from xwin_jax.serve_engine import BatchingGenerator, RequestError, Row, Update

__all__ = ["BatchingGenerator", "RequestError", "create_app", "serve"]


class ChatMessage(pydantic.BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(pydantic.BaseModel):
    include_usage: bool = False


class SamplingFields(pydantic.BaseModel):
    model: str | None = None
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float = pydantic.Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = pydantic.Field(default=0, ge=0, le=2**31 - 1)  # extra_body={"top_k": 40}
    n: int = pydantic.Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**31 - 1)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(default=None, ge=1)  # newer clients


class CompletionRequest(SamplingFields):
    prompt: str


class _ChoiceText:
    """One choice's token ids → the text deltas to send; see the module docstring."""

    def __init__(self, vocab, stop: str | list[str] | None, strip: bool):
        self.vocab, self.strip = vocab, strip
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string ended the text
        self.num_tokens = 0  # tokens the text used: up to the one completing a stop string

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held_from(self, text: str) -> int:
        """Where the text that may still change begins."""
        # An incomplete UTF-8 character decodes to U+FFFD: hold it, and look for the start of
        # a stop string in what comes before it (a stop may be arriving a byte at a time).
        text = text[:len(text.rstrip("\ufffd"))]
        end = len(text)
        for stop in self.stops:  # the longest tail that begins a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    end = min(end, len(text) - k)
                    break
        return len(text[:end].rstrip()) if self.strip else end

    def feed(self, ids: Sequence[int], final: bool) -> str:
        """Takes new ids (final: the choice has no more) and returns the text now safe to
        send."""
        if self.stopped:
            return ""
        start = len(self.ids)
        self.ids.extend(ids)
        text = self.vocab.decode(self.ids)
        cut = self._first_stop(text)
        self.num_tokens = len(self.ids)
        if cut is not None:
            self.stopped, final, text = True, True, text[:cut]
            self.num_tokens = next(k for k in range(start + 1, len(self.ids) + 1)
                                   if self._first_stop(self.vocab.decode(self.ids[:k]))
                                   is not None)
        if self.strip:
            text = text.lstrip()
        safe = (text.rstrip() if self.strip else text) if final else text[:self._held_from(text)]
        if not safe.startswith(self.sent):  # held-back text exists to make this impossible
            raise RuntimeError(f"streamed text {self.sent!r} is not a prefix of {safe!r}")
        delta, self.sent = safe[len(self.sent):], safe
        return delta


class _Completion:
    """One request's n choices on the generator: token updates in, text deltas out."""

    def __init__(self, generator: BatchingGenerator, prompt_ids: list[int],
                 request: SamplingFields, max_tokens: int, prompt_param: str, strip: bool):
        self._loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.prompt_tokens = len(prompt_ids)
        self.texts = [_ChoiceText(generator.vocab, request.stop, strip)
                      for _ in range(request.n)]
        self.finish: list[str | None] = [None] * request.n
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        self._rows = [Row(prompt_ids, max_tokens, request.temperature, request.top_k,
                          request.top_p, seed, choice, functools.partial(self._put, choice))
                      for choice in range(request.n)]
        generator.submit(self._rows, prompt_param)

    def _put(self, choice: int, update: Update) -> None:  # on the worker thread
        self._loop.call_soon_threadsafe(self._updates.put_nowait, (choice, update))

    def cancel(self) -> None:
        for row in self._rows:
            row.cancel()

    async def deltas(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason once the choice is done) until all are done."""
        while None in self.finish:
            choice, update = await self._updates.get()
            if update.error is not None:
                raise update.error
            if self.finish[choice]:
                continue  # stopped by a stop string; tokens already on their way
            text = self.texts[choice]
            delta = text.feed(update.ids, final=update.finish is not None)
            if text.stopped:
                self._rows[choice].cancel()
            self.finish[choice] = "stop" if text.stopped else update.finish
            if delta or self.finish[choice]:
                yield choice, delta, self.finish[choice]

    async def collect(self) -> list[str]:
        """Every choice's whole text."""
        texts = [""] * len(self.texts)
        async for choice, delta, _ in self.deltas():
            texts[choice] += delta
        return texts

    def usage(self) -> dict:
        completion = sum(text.num_tokens for text in self.texts)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _events(completion: _Completion, head: dict, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion (OpenAI's chunk format)."""
    def chunk(choices, usage=None):
        body = {**head, "choices": choices}
        if include_usage:  # as OpenAI: null on every chunk but the last
            body["usage"] = usage
        return _sse(body)

    def choice_chunk(index, text, finish):
        body = {"delta": {"content": text} if text else {}} if chat else {"text": text}
        return chunk([{"index": index, **body, "logprobs": None, "finish_reason": finish}])

    try:
        if chat:
            for index in range(len(completion.texts)):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
        async for index, text, finish in completion.deltas():
            if text:
                yield choice_chunk(index, text, None)
            if finish:
                yield choice_chunk(index, "", finish)
        if include_usage:
            yield chunk([], usage=completion.usage())
        yield _sse("[DONE]")
    except Exception as err:  # headers are gone: the error travels as an event
        yield _sse(_error_body(f"generation failed: {err}", "server_error"))
    finally:
        completion.cancel()  # the client may have gone: stop decoding its rows


def create_app(generator: BatchingGenerator, model_name: str, system: str | None = None,
               default_max_tokens: int = 256, max_n: int = 8):
    import fastapi
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI(title="xwin_jax", version="1")
    vocab = generator.vocab

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(status_code=400, content=_error_body(
            f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where))

    @app.exception_handler(RequestError)
    async def on_request_error(request, exc):
        return JSONResponse(status_code=400,
                            content=_error_body(str(exc), param=exc.param, code=exc.code))

    @app.exception_handler(Exception)
    async def on_server_error(request, exc):
        return JSONResponse(status_code=500, content=_error_body(
            f"internal error: {exc}", "server_error"))

    def check(request: SamplingFields):
        if request.model not in (None, model_name):
            raise RequestError(f"model {request.model!r} is not served here; this server "
                               f"serves {model_name!r}", "model")
        if request.n > max_n:
            raise RequestError(f"n={request.n} is over this server's limit of {max_n}", "n")
        if request.stream_options is not None and not request.stream:
            raise RequestError("stream_options is only allowed with stream=true",
                               "stream_options")

    async def respond(request: SamplingFields, prompt_ids: list[int], prompt_param: str,
                      max_tokens: int | None, chat: bool):
        # Without max_tokens the default shrinks to what the context has room for.
        room = generator.cfg.max_seq_len - len(prompt_ids)
        completion = _Completion(generator, prompt_ids, request,
                                 max_tokens or max(1, min(default_max_tokens, room)),
                                 prompt_param, strip=chat)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(_events(completion, head, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            texts = await completion.collect()
        except Exception as err:  # the batch failed: answered here, the connection stays up
            return JSONResponse(status_code=500, content=_error_body(
                f"generation failed: {err}", "server_error"))
        finally:
            completion.cancel()
        choices = [{"index": i, **({"message": {"role": "assistant", "content": text}}
                                   if chat else {"text": text}),
                    "finish_reason": completion.finish[i], "logprobs": None}
                   for i, text in enumerate(texts)]
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": choices, "usage": completion.usage()}

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
        return await respond(request, prompt_ids, "messages",
                             request.max_tokens or request.max_completion_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        check(request)
        prompt_ids = [vocab.bos_id] + vocab.encode(request.prompt)
        return await respond(request, prompt_ids, "prompt", request.max_tokens, chat=False)

    return app


def serve(model: LlamaConfig, *, ckpt_dir: str, vocabulary: Any = None,
          host: str = "127.0.0.1", port: int = 8000, model_name: str = "xwin_jax",
          max_batch_size: int = 8, max_prompt_len: int = 1024, default_max_tokens: int = 256,
          max_tokens_limit: int = 1024, max_n: int = 8, chunk_tokens: int = 16,
          warmup_prompt_lens: Sequence[int] = (64, 128, 256),
          warmup_max_tokens: Sequence[int] | None = None,
          warmup_modes: Sequence[str] = ("greedy", "sample"), system: str | None = None,
          partitioner: Partitioner | None = None) -> None:
    """The serve job: loads the checkpoint (a params checkpoint or an HF directory; its
    recorded vocabulary unless `vocabulary` overrides it) in the partitioner's shardings,
    compiles the warm-up buckets (those holding warmup_prompt_lens x warmup_max_tokens —
    default: (default_max_tokens,) — in warmup_modes; warmup_prompt_lens=() for none), then
    serves until interrupted."""
    import uvicorn

    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise ConfigError(f"default_max_tokens={default_max_tokens}: must be between 1 and "
                          f"max_tokens_limit={max_tokens_limit}")
    if max_n < 1:
        raise ConfigError(f"max_n={max_n}: must be at least 1")
    policy = Start.policy(model, ckpt_dir, vocabulary, what="CKPT_DIR")
    params, _ = frozen_params(policy.checkpoint, LM, partitioner or Partitioner())
    generator = BatchingGenerator(params, policy.config, policy.vocabulary, max_batch_size,
                                  max_prompt_len, max_tokens_limit, chunk_tokens)
    began = time.perf_counter()
    compiled = generator.warm_up(warmup_prompt_lens, warmup_max_tokens or [default_max_tokens],
                                 warmup_modes)
    print(f"[serve] warm-up: {compiled} programs in {time.perf_counter() - began:.1f}s "
          f"(at most {generator.program_bound}; prompt buckets {generator.prompt_buckets}, "
          f"max_tokens buckets {generator.budget_buckets})")
    app = create_app(generator, model_name, system, default_max_tokens, max_n)
    print(f"[serve] {model_name} on http://{host}:{port}/v1 (max batch {max_batch_size})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
