"""The OpenAI-compatible server, driven by the `openai` client over loopback."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import openai
import pytest

from xwin_jax import sampling, serve
from xwin_jax.data import converters
from xwin_jax.data.formats import USER, Conversation, Message
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.models import llama

CFG = llama.preset("tiny")
PARAMS = llama.init_params(CFG, jax.random.key(0))
VOCAB = ByteVocabulary()


@pytest.fixture(scope="module")
def server():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    generator = serve.BatchingGenerator(PARAMS, CFG, VOCAB, max_batch_size=4)
    app = serve.create_app(generator, "tiny", default_max_tokens=8)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    yield client, generator
    server.should_exit = True
    thread.join(timeout=10)


def greedy_text(prompt_ids, max_tokens):
    out = sampling.generate(PARAMS, CFG, np.asarray([prompt_ids]), np.ones((1, len(prompt_ids))),
                            jax.random.key(0), max_new_tokens=max_tokens)
    n = int(out.lengths[0]) - int(out.finished[0])
    return VOCAB.decode(out.tokens[0, :n])


def test_chat_completion_is_the_greedy_answer_to_the_template(server):
    client, _ = server
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=6, temperature=0.0)
    prompt = converters.prompts_batch([Conversation((Message(USER, "What is 2 + 2?"),))],
                                      VOCAB, 1024)
    ids = prompt["tokens"][0][prompt["mask"][0] > 0].tolist()
    assert reply.choices[0].message.content == greedy_text(ids, 6).strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens <= 6


def test_completion_continues_raw_text(server):
    client, _ = server
    reply = client.completions.create(model="tiny", prompt="USER: hi", max_tokens=5,
                                      temperature=0.0)
    ids = [VOCAB.bos_id] + VOCAB.encode("USER: hi")
    assert reply.choices[0].text == greedy_text(ids, 5)
    assert reply.object == "text_completion"


@pytest.mark.parametrize("kwargs,param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    (dict(messages=[{"role": "user", "content": "x"}], temperature=5.0), "temperature"),
    (dict(messages=[{"role": "assistant", "content": "x"}]), "messages"),
    (dict(messages=[{"role": "user", "content": "x"}], stream=True), "stream"),
])
def test_bad_requests_get_400_with_an_openai_error(server, kwargs, param):
    client, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", max_tokens=2, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_concurrent_requests_are_batched_and_each_correct(server):
    client, generator = server
    questions = [f"Question number {i}?" for i in range(6)]
    before = generator.batches_run

    def ask(question):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=4,
            temperature=0.0).choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, questions))
    assert generator.batches_run - before < len(questions)  # some requests shared a batch
    for question, answer in zip(questions, answers):
        prompt = converters.prompts_batch([Conversation((Message(USER, question),))], VOCAB, 1024)
        ids = prompt["tokens"][0][prompt["mask"][0] > 0].tolist()
        assert answer == greedy_text(ids, 4).strip()
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_seeds_are_per_request_whoever_shares_the_batch(server):
    client, _ = server

    def ask(question, seed=None):
        kwargs = {} if seed is None else {"seed": seed}
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=8,
            temperature=1.0, **kwargs).choices[0].message.content

    alone = ask("Tell me something.", seed=123)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: ask(*q), [("Tell me something.", 123), ("Other?", 5),
                                                     ("Third.", 6), ("Fourth!", 7)]))
    assert together[0] == alone
    assert ask("Tell me something.") != ask("Tell me something.")  # no seed: fresh randomness


def test_an_oversized_request_is_refused_and_does_not_fail_its_batchmates(server):
    client, _ = server

    def ask(max_tokens):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=max_tokens,
            temperature=0.0)

    with ThreadPoolExecutor(2) as pool:
        huge, normal = pool.submit(ask, 10**12), pool.submit(ask, 4)
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
