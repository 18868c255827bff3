"""The OpenAI-compatible server, driven by the `openai` client over loopback."""

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import openai
import pytest

from conftest import serve_on_loopback
from xwin_jax import sampling, serve
from xwin_jax.data import converters
from xwin_jax.data.formats import USER, Conversation, Message
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.models import llama
from xwin_jax.serve_engine import _row_keys

CFG = llama.preset("tiny")  # max_seq_len 512
PARAMS = llama.init_params(CFG, jax.random.key(0))
VOCAB = ByteVocabulary()
MAX_N = 4


@pytest.fixture(scope="module")
def server():
    generator = serve.BatchingGenerator(PARAMS, CFG, VOCAB, max_batch_size=4, chunk_tokens=4)
    # Short completions prompts, the default max_tokens, greedy: what the first tests send.
    assert generator.warm_up([8], [8], ["greedy"]) == 2  # a prefill and a chunk program
    app = serve.create_app(generator, "tiny", default_max_tokens=8, max_n=MAX_N)
    server, port = serve_on_loopback(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    yield client, generator
    server.should_exit = True


def chat_ids(question):
    prompt = converters.prompts_batch([Conversation((Message(USER, question),))], VOCAB, 1024)
    return prompt["tokens"][0][prompt["mask"][0] > 0].tolist()


def sampled_ids(prompt_ids, max_tokens, temperature=0.0, seed=0, choice=0):
    """The server's answer computed alone (choice i samples with fold_in(key(seed), i)), in
    one shape for every call (fewer compilations): the first max_tokens of 24, up to EOS."""
    keys = _row_keys(np.asarray([seed], np.uint32), np.asarray([choice], np.uint32))
    batch = converters.left_padded_batch([prompt_ids], 256, VOCAB.pad_id)
    out = sampling.generate(PARAMS, CFG, batch["tokens"], batch["mask"], keys,
                            max_new_tokens=24, temperature=temperature)
    ids = out.tokens[0, :max_tokens].tolist()
    return ids[:ids.index(VOCAB.eos_id)] if VOCAB.eos_id in ids else ids


def sampled_text(*args, **kwargs):
    return VOCAB.decode(sampled_ids(*args, **kwargs))


def ask(client, question, **kwargs):
    kwargs.setdefault("max_tokens", 4)
    kwargs.setdefault("temperature", 0.0)
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], **kwargs)


def test_chat_completion_is_the_greedy_answer_to_the_template(server):
    client, _ = server
    reply = ask(client, "What is 2 + 2?", max_tokens=6)
    ids = chat_ids("What is 2 + 2?")
    assert reply.choices[0].message.content == sampled_text(ids, 6).strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens <= 6
    short = client.chat.completions.create(  # the newer clients' name for max_tokens
        model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_completion_tokens=3, temperature=0.0)
    assert short.choices[0].message.content == sampled_text(ids, 3).strip()
    assert short.usage.completion_tokens <= 3


def test_a_warmed_bucket_compiles_nothing_on_first_use(server):
    client, _ = server
    before = sampling.stream_program_count()
    reply = client.completions.create(model="tiny", prompt="USER: hi", temperature=0.0)
    assert reply.choices[0].text == sampled_text([VOCAB.bos_id] + VOCAB.encode("USER: hi"), 8)
    assert reply.object == "text_completion" and reply.usage.completion_tokens <= 8
    assert sampling.stream_program_count() == before


@pytest.mark.parametrize("kwargs,param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (dict(messages=[{"role": "user", "content": "x"}], temperature=5.0), "temperature"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), "messages"),
    (dict(messages=[{"role": "user", "content": "x"}], n=MAX_N + 1), "n"),
    (dict(messages=[{"role": "user", "content": "x"}], stream=True, n=MAX_N + 1), "n"),
    (dict(messages=[{"role": "user", "content": "x"}],
          stream_options={"include_usage": True}), "stream_options"),
])
def test_bad_requests_get_400_with_an_openai_error(server, kwargs, param):
    client, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", max_tokens=2, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_plus_max_tokens_over_the_context_is_refused(server, stream):
    client, _ = server
    with pytest.raises(openai.BadRequestError) as err:  # 601 tokens, no max_tokens
        client.completions.create(model="tiny", prompt="x" * 600, stream=stream)
    assert err.value.body["param"] == "prompt"
    assert err.value.body["code"] == "context_length_exceeded"
    assert "512" in err.value.body["message"] and "601 in the prompt" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # fits alone, not with max_tokens
        client.completions.create(model="tiny", prompt="x" * 449, max_tokens=100)
    assert "needs 550: 450 in the prompt plus max_tokens=100" in err.value.body["message"]


def test_concurrent_requests_are_batched_and_each_correct(server):
    client, generator = server
    questions = [f"Question number {i}?" for i in range(6)]
    before = generator.batches_run
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda q: ask(client, q).choices[0].message.content,
                                questions))
    assert generator.batches_run - before < len(questions)  # some requests shared a batch
    for question, answer in zip(questions, answers):
        assert answer == sampled_text(chat_ids(question), 4).strip()
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_mixed_settings_share_a_batch_and_each_gets_its_own_answer(server):
    client, generator = server
    settings = [dict(temperature=0.0), dict(temperature=1.0, seed=3),
                dict(temperature=0.7, top_p=0.8, seed=4), dict(temperature=1.3, seed=5)]
    answer = lambda kwargs: ask(client, "Mix?", max_tokens=6,  # noqa: E731
                                **kwargs).choices[0].message.content
    before = generator.batches_run
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(answer, settings))
    assert generator.batches_run - before < len(settings)
    assert together == [answer(kwargs) for kwargs in settings]  # each as if decoded alone
    assert together[0] == sampled_text(chat_ids("Mix?"), 6).strip()  # the greedy answer
    assert len(set(together)) == len(together)


def test_seeds_are_per_request_whoever_shares_the_batch(server):
    client, _ = server

    def answer(question, seed=None):
        kwargs = {} if seed is None else {"seed": seed}
        return ask(client, question, max_tokens=8, temperature=1.0,
                   **kwargs).choices[0].message.content

    alone = answer("Tell me something.", seed=123)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: answer(*q), [("Tell me something.", 123),
                                                        ("Other?", 5), ("Third.", 6),
                                                        ("Fourth!", 7)]))
    assert together[0] == alone
    assert answer("Tell me something.") != answer("Tell me something.")  # fresh randomness


def test_streamed_chat_concatenates_to_the_answer(server):
    client, _ = server
    whole = ask(client, "Stream me?", max_tokens=16)
    chunks = list(ask(client, "Stream me?", max_tokens=16, stream=True,
                      stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices
               and c.choices[0].delta.content]
    assert len(content) > 1  # sent as the decode went, not in one piece
    assert "".join(content) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_completion_with_a_stop_string_matches_and_ends_with_done(server):
    client, _ = server
    prompt = "Once upon a time"
    free = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                     temperature=0.0).choices[0].text
    # The random model's text mixes characters and invalid bytes (U+FFFD): stop at two
    # plain characters past the start.
    stop = next(free[i:i + 2] for i in range(3, len(free))
                if free[i:i + 2].isascii() and free[i:i + 2].isprintable())
    expected = free[:free.find(stop)]
    assert expected
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                      temperature=0.0, stop=[stop, "never seen"])
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                            temperature=0.0, stop=[stop, "never seen"],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "text_completion" for c in chunks)
    # On the wire: server-sent events ending with [DONE].
    body = json.dumps(dict(prompt=prompt, max_tokens=6, temperature=0.0, stream=True))
    with urllib.request.urlopen(urllib.request.Request(
            f"{client.base_url}completions", body.encode(),
            {"Content-Type": "application/json"}), timeout=60) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_choices_are_each_their_own_sample(server):
    client, _ = server
    ids = chat_ids("Choose?")
    reply = ask(client, "Choose?", max_tokens=6, temperature=1.0, seed=11, n=3)
    texts = [c.message.content for c in reply.choices]
    alone = [sampled_ids(ids, 6, 1.0, seed=11, choice=i) for i in range(3)]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert texts == [VOCAB.decode(a).strip() for a in alone] and len(set(texts)) > 1
    # The prompt counts once, completions add up.
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == sum(map(len, alone))
    greedy = ask(client, "Choose?", max_tokens=6, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1
    # Streamed, each choice's chunks carry its index and add up to the same samples.
    chunks = list(ask(client, "Choose?", max_tokens=6, temperature=1.0, seed=11, n=3,
                      stream=True))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks
                        if c.choices[0].index == i) for i in range(3)]
    assert streamed == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1, 2]


def test_bounded_load_with_distinct_settings_compiles_within_the_bound(server):
    client, generator = server
    ask(client, "Warm?", temperature=0.5), ask(client, "Warm?", temperature=0.5, top_p=0.9)
    before = sampling.stream_program_count()
    latencies = []

    def timed(i):
        began = time.perf_counter()
        reply = ask(client, f"Load {i}?", temperature=0.02 * (i + 1),
                    top_p=1.0 if i % 2 else 0.5 + i / 200, seed=i,
                    extra_body={"top_k": 10 * (i % 3)})
        latencies.append(time.perf_counter() - began)
        return reply.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        finishes = list(pool.map(timed, range(64)))
    assert len(finishes) == 64 and set(finishes) <= {"stop", "length"}
    # 64 temperatures, 32 top_p and 3 top_k values, one bucket pair: nothing new to compile.
    assert sampling.stream_program_count() == before
    assert sampling.stream_program_count() <= generator.program_bound
    print(f"64 requests at concurrency 16: p50 {np.percentile(latencies, 50):.3f}s "
          f"p99 {np.percentile(latencies, 99):.3f}s")


def test_an_oversized_request_is_refused_and_does_not_fail_its_batchmates(server):
    client, _ = server
    with ThreadPoolExecutor(2) as pool:
        huge, normal = (pool.submit(ask, client, "Hi", max_tokens=m) for m in (10**12, 4))
        with pytest.raises(openai.BadRequestError) as err:
            huge.result()
        assert err.value.body["param"] == "max_tokens"
        assert normal.result().choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
     {"role": "assistant", "content": "y"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
     {"role": "user", "content": "b"}],
])
def test_chat_histories_that_do_not_alternate_are_refused(server, messages):
    client, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert err.value.body["param"] == "messages" and "alternate" in err.value.body["message"]


def test_a_failing_decode_fails_its_requests_and_the_server_keeps_serving(server, monkeypatch):
    client, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")
        yield

    monkeypatch.setattr(sampling, "stream", broken)
    with pytest.raises(openai.InternalServerError) as err:
        ask(client, "Fail?")
    assert err.value.body["type"] == "server_error" and "device lost" in err.value.body["message"]
    with pytest.raises(openai.APIError, match="device lost"):  # an error event mid-stream
        list(ask(client, "Fail?", stream=True))
    monkeypatch.undo()
    assert ask(client, "Fine?").choices[0].finish_reason in ("stop", "length")


def feed_one_by_one(text, stop, strip):
    choice = serve._ChoiceText(VOCAB, stop, strip)
    ids = VOCAB.encode(text)
    deltas = [choice.feed(ids[i:i + 1], final=i == len(ids) - 1) for i in range(len(ids))]
    return deltas, choice


def test_streamed_text_holds_back_what_may_still_change():
    deltas, choice = feed_one_by_one("  héllo STxSTOP more", ["STOP"], strip=False)
    assert "".join(deltas) == "  héllo STx" and choice.stopped
    assert choice.num_tokens == len("  héllo STxSTOP".encode())  # up to the stop string
    assert all("\ufffd" not in d for d in deltas)  # é's two bytes arrive one at a time
    assert "ST" not in "".join(deltas[:len("  héllo ST".encode())])  # held until the x
    deltas, choice = feed_one_by_one("  hi there \n", ["zz"], strip=True)
    assert "".join(deltas) == "hi there" and not choice.stopped
    assert deltas[4:6] == ["", " t"]  # a space is held until a word follows it
    # A non-ASCII stop arriving a byte at a time: its first character is held too.
    deltas, choice = feed_one_by_one("ab€zz", ["b€"], strip=False)
    assert "".join(deltas) == "a" and choice.stopped and choice.sent == "a"


def test_the_serve_job_writes_nothing_into_the_checkpoint_directory(tmp_path, monkeypatch):
    import uvicorn

    from xwin_jax import launch
    from xwin_jax.checkpoints.params import save_params

    ckpt = tmp_path / "ckpt"
    save_params(str(ckpt), CFG, PARAMS, vocabulary=VOCAB)
    before = sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(kwargs))
    monkeypatch.chdir(tmp_path)
    launch.run_gin_job(["models/tiny.gin", "runs/serve.gin"], [
        f"CKPT_DIR = '{ckpt}'", "serve.serve.warmup_prompt_lens = ()"])
    assert served == [{"host": "127.0.0.1", "port": 8000, "log_level": "warning"}]
    assert sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before
    assert not list(tmp_path.rglob("config.gin"))


def test_the_serve_job_tokenizes_with_the_checkpoint_s_vocabulary(tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    from test_generate_job import merged_vocabulary
    from xwin_jax import launch
    from xwin_jax.checkpoints.params import save_params

    vocab = merged_vocabulary(tmp_path / "tokenizer")
    save_params(str(tmp_path / "ckpt"), CFG, PARAMS, vocabulary=vocab)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))

    def prompt_tokens(*bindings):
        launch.run_gin_job(["models/tiny.gin", "runs/serve.gin"], [
            f"CKPT_DIR = '{tmp_path / 'ckpt'}'", "serve.serve.warmup_prompt_lens = ()",
            "serve.serve.max_batch_size = 1", *bindings])
        with TestClient(apps[-1]) as client:
            reply = client.post("/v1/completions", json={"prompt": "Say hi", "max_tokens": 1,
                                                         "temperature": 0.0})
        return reply.json()["usage"]["prompt_tokens"]

    # BOS + "Say" + " hi": the merges of the recorded tokenizer; bytes when told so.
    assert prompt_tokens() == 1 + len(vocab.encode("Say hi")) == 3
    assert prompt_tokens("VOCABULARY = 'bytes'") == 1 + len("Say hi")
