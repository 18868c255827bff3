"""Multi-turn Xwin-Pair: conversations as prompts. The judge sees the whole conversation, the
pairs file carries it, and the reward model and DPO read the final answer only."""

import hashlib
import json

import jax
import numpy as np
import pytest
from conftest import numpy_response_logprobs

from conftest import FakeJudge, serve_on_loopback
from xwin_jax import jobs
from xwin_jax.annotate import judge as judge_lib
from xwin_jax.annotate import pairs as pairs_lib
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data import formats, synthetic
from xwin_jax.data.converters import pairs_batch
from xwin_jax.data.formats import ASSISTANT, USER, Conversation, Message, PreferencePair
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.models import heads, llama
from xwin_jax.partitioning import Partitioner
from xwin_jax.train import dpo, reward

VOCAB = ByteVocabulary()
CFG = llama.preset("tiny", hidden_size=32, intermediate_size=64, num_layers=1)


def conversation(*texts):
    """user, assistant, user, ... messages from their texts."""
    return Conversation(tuple(Message(USER if i % 2 == 0 else ASSISTANT, t)
                              for i, t in enumerate(texts)))


TWO_EXCHANGES = conversation("Repeat exactly: 'egit'.",
                             "The answer is egit.", "Now write your answer in uppercase.")


# --- the final answer is the response -------------------------------------------------------

def test_a_multi_turn_pair_masks_exactly_the_final_answer_and_its_eos():
    pair = PreferencePair(TWO_EXCHANGES, "The answer is EGIT.", "The answer is TIGE.")
    batch = pairs_batch([pair], VOCAB, seq_len=512)
    for side, text in (("chosen", " The answer is EGIT."), ("rejected", " The answer is TIGE.")):
        tokens, mask = batch[f"{side}_tokens"][0], batch[f"{side}_response_mask"][0]
        masked = tokens[mask > 0]
        assert masked[-1] == VOCAB.eos_id and VOCAB.decode(masked[:-1]) == text
        assert mask.sum() == len(text) + 1  # bytes: one token per character, plus </s>
        # The earlier answer and its </s> are context: in the row, not in the mask.
        before = VOCAB.decode(tokens[:int(mask.argmax())][tokens[:int(mask.argmax())] > 2])
        assert before.endswith("USER: Repeat exactly: 'egit'. ASSISTANT: "
                               "The answer is egit.USER: Now write your answer in uppercase. "
                               "ASSISTANT:")
        assert (tokens[:int(mask.argmax())] == VOCAB.eos_id).sum() == 1
        assert batch[f"{side}_length"][0] == int(mask.nonzero()[0][-1]) + 1


def test_rewards_are_read_at_the_final_answers_eos():
    """The RM's score of a multi-turn pair side is its per-token score at the final </s>."""
    pairs = [PreferencePair(TWO_EXCHANGES, "The answer is EGIT.", "No."),
             PreferencePair(conversation("Is 7 even or odd?"), "The answer is odd.", "odd")]
    batch = pairs_batch(pairs, VOCAB, seq_len=320)
    model = heads.RewardModel(CFG)
    params = heads.init_reward_params(CFG, jax.random.key(1))
    got = np.concatenate(list(map(np.asarray, reward.pair_rewards(model, params, batch))))
    tokens = np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
    mask = np.concatenate([batch["chosen_response_mask"], batch["rejected_response_mask"]])
    real = (tokens != VOCAB.pad_id).astype(np.int32)
    per_token = np.asarray(model.apply({"params": params}, tokens, real, per_token=True))
    for row in range(4):
        last = int(mask[row].nonzero()[0][-1])  # the final answer's </s>
        assert tokens[row, last] == VOCAB.eos_id and real[row, last + 1:].sum() == 0
        np.testing.assert_allclose(got[row], per_token[row, last], rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) == 4  # four different rows, four different rewards


def _logprobs(params, pairs):
    batch = pairs_batch(pairs, VOCAB, seq_len=256)
    tokens, mask = batch["chosen_tokens"], batch["chosen_response_mask"]
    return np.asarray(dpo.sequence_logprobs(CFG, params, tokens, mask)), tokens, mask


def test_dpo_logprobs_sum_the_final_answer_only():
    params = llama.init_params(CFG, jax.random.key(0))
    base = PreferencePair(TWO_EXCHANGES, "The answer is EGIT.", "x")
    other_final = PreferencePair(TWO_EXCHANGES, "The answer is TIGE.", "x")
    earlier = conversation("Repeat exactly: 'egit'.",
                           "Sure! The answer is tieg, I think.",
                           "Now write your answer in uppercase.")
    other_context = PreferencePair(earlier, "The answer is EGIT.", "x")
    got, tokens, mask = _logprobs(params, [base, other_final, other_context])
    # An independent reference: log-softmax of the full logits, summed where the mask is 1.
    np.testing.assert_allclose(got, numpy_response_logprobs(CFG, params, tokens, mask),
                               rtol=1e-4)
    # Only the final answer is counted: the same number of tokens whatever came before...
    assert mask[0].sum() == mask[2].sum() == len(" The answer is EGIT.") + 1
    # ...and the earlier answer changes the log-prob only as context (the same final tokens,
    # conditioned on another history), while another final answer is another sum.
    assert got[0] != got[1] and got[0] != got[2]
    np.testing.assert_array_equal(tokens[0][mask[0] > 0], tokens[2][mask[2] > 0])


# --- the judge sees the conversation --------------------------------------------------------

def test_single_turn_judge_prompts_and_cache_keys_are_unchanged():
    prompt = "What is 40 + 2?"
    text = judge_lib.render_prompt(prompt, "A1", "B1")
    assert text == judge_lib.JUDGE_TEMPLATE.format(prompt=prompt, response_a="A1",
                                                   response_b="B1")
    assert text.startswith("[User request]\nWhat is 40 + 2?\n\n[Answer A]\nA1\n\n[Answer B]\nB1")
    single = Conversation((Message("system", "Be terse."), Message(USER, prompt)))
    assert judge_lib.render_prompt(single, "A1", "B1") == text  # one user turn: as before
    # The key every release has written: sha256 of [prompt, a, b, model, "xwin-pair-v1"].
    old = hashlib.sha256(json.dumps([prompt, "A1", "B1", "gpt-4", "xwin-pair-v1"]).encode()
                         ).hexdigest()
    assert old == "68eab8c3d1f6e0f64d21797add9256b6f4ec2614b42a881153290876334c1c1f"
    assert pairs_lib.cache_key(prompt, "A1", "B1", "gpt-4") == old
    assert pairs_lib.cache_key(single, "A1", "B1", "gpt-4") == old


def test_a_multi_turn_prompt_shows_the_earlier_turns_and_keys_on_every_turn():
    text = judge_lib.render_prompt(TWO_EXCHANGES, "A1", "B1")
    assert text == (
        "[Conversation so far] (both answers below reply to the user request that follows it, "
        "in its context)\nUser: Repeat exactly: 'egit'.\n\nAssistant: The "
        "answer is egit.\n\n" + judge_lib.JUDGE_TEMPLATE.format(
            prompt="Now write your answer in uppercase.", response_a="A1", response_b="B1"))
    key = pairs_lib.cache_key(TWO_EXCHANGES, "A1", "B1", "gpt-4")
    assert key != pairs_lib.cache_key("Now write your answer in uppercase.", "A1", "B1", "gpt-4")
    other_history = conversation("Repeat exactly: 'egit'.",
                                 "The answer is tieg.", "Now write your answer in uppercase.")
    assert pairs_lib.cache_key(other_history, "A1", "B1", "gpt-4") != key
    assert pairs_lib.excerpt(TWO_EXCHANGES) == ("Now write your answer in uppercase. "
                                                "[after 2 earlier turns]")


def test_the_rule_judge_wrapper_judges_the_follow_up_from_the_conversation():
    judge = judge_lib.RuleJudge()
    verdict = judge.compare(TWO_EXCHANGES, "The answer is TIGE.", "The answer is EGIT.")
    assert (verdict["better"], verdict["rating_a"], verdict["rating_b"]) == ("B", 3.0, 10.0)
    assert judge.rate(TWO_EXCHANGES, "The answer is EGIT.") == 10.0
    assert judge.usage["calls"] == 1


def _recording(app, bodies):
    """The ASGI app, recording each request's JSON body (what the judge endpoint receives)."""
    async def wrapped(scope, receive, send):
        chunks = []

        async def receive_and_record():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    bodies.append(json.loads(b"".join(chunks)))
            return message

        await app(scope, receive_and_record, send)
    return wrapped


@pytest.fixture
def recording_judge():
    servers = []

    def start():
        fake, bodies = FakeJudge([]), []
        server, port = serve_on_loopback(_recording(fake.app(), bodies))
        servers.append(server)
        return fake, bodies, judge_lib.OpenAIJudge(
            model="fake-gpt-4", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test",
            timeout_s=2.0, backoff_s=0.01)

    yield start
    for server in servers:
        server.should_exit = True


MT_PROMPTS = [formats.parse_prompt({"prompt": formats.messages_to_json(c.messages)})
              for c in (TWO_EXCHANGES, conversation("What is 12 * 3?", "The answer is 36.",
                                                    "Reverse your answer.")) ] + [
    formats.parse_prompt({"prompt": "Is 7 even or odd?"})]
MT_RESPONSES = [["The answer is EGIT.", "The answer is 63.", "The answer is odd."],
                ["The answer is EGIT, in capitals as you asked.", "63, reversed from 36.",
                 "It is odd, since 7 = 2 * 3 + 1."]]


def test_annotate_shows_the_conversation_writes_it_and_resumes_without_paying_twice(
        recording_judge, tmp_path):
    fake, bodies, judge = recording_judge()
    out = tmp_path / "out"
    summary = pairs_lib.annotate_responses(MT_PROMPTS, MT_RESPONSES, str(out), judge)
    assert (summary["judged"], summary["pairs"]) == (3, 3) and fake.calls == 3
    user_messages = sorted((b["messages"][-1]["content"] for b in bodies), key=len)
    single, *multi = user_messages
    assert single.startswith("[User request]\nIs 7 even or odd?\n\n")
    assert "[Conversation so far]" not in single
    for prompt in MT_PROMPTS[:2]:  # each conversation reached the judge whole, once
        earlier_user, earlier_answer, last = (m.content for m in prompt.conversation.messages)
        shown = (f"\nUser: {earlier_user}\n\nAssistant: {earlier_answer}\n\n[User request]\n"
                 f"{last}\n\n[Answer A]\n")
        assert sum(shown in message for message in multi) == 1
    # pairs.jsonl: the whole conversation as a messages list, read back by read_pairs.
    records = [json.loads(line) for line in open(out / pairs_lib.PAIRS_FILE)]
    assert records[0]["prompt"] == formats.messages_to_json(TWO_EXCHANGES.messages)
    assert records[2]["prompt"] == "Is 7 even or odd?"
    pairs = formats.read_pairs(summary["pairs_file"]).records
    assert [p.prompt.messages for p in pairs] == [p.conversation.messages for p in MT_PROMPTS]
    assert [p.chosen for p in pairs] == MT_RESPONSES[0]  # the fake prefers the shorter answer
    # The cache keys: every turn for the multi-turn items, the old formula for the single one.
    keys = [json.loads(line)["key"] for line in open(out / pairs_lib.CACHE_FILE)]
    expected = [pairs_lib.cache_key(p.conversation, a, b, "fake-gpt-4")
                for p, a, b in zip(MT_PROMPTS, *MT_RESPONSES)]
    assert sorted(keys) == sorted(expected)
    assert expected[2] == hashlib.sha256(json.dumps([
        "Is 7 even or odd?", MT_RESPONSES[0][2], MT_RESPONSES[1][2], "fake-gpt-4",
        "xwin-pair-v1"]).encode()).hexdigest()

    # Killed after one verdict (the next cut off mid-line): the rerun pays for two, then none.
    lines = open(out / pairs_lib.CACHE_FILE).readlines()
    (out / pairs_lib.CACHE_FILE).write_text(lines[0] + lines[1][:30])
    fake, bodies, judge = recording_judge()
    pairs_lib.annotate_responses(MT_PROMPTS, MT_RESPONSES, str(out), judge)
    assert fake.calls == 2
    assert [json.loads(line) for line in open(out / pairs_lib.PAIRS_FILE)] == records
    again = pairs_lib.annotate_responses(MT_PROMPTS, MT_RESPONSES, str(out), judge)
    assert fake.calls == 2 and again["pairs"] == 3


class OrderJudge(judge_lib.RuleJudge):
    """Random-weight policies answer gibberish (all max_new_tokens long): the answer first in
    code-point order wins. Records what it is asked about."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def compare(self, prompt, a, b):
        self.asked.append(prompt)
        better = "A" if a < b else "B"  # a != b: pair_items skips identical answers
        return {"better": better, "rating_a": 6.0 if better == "A" else 3.0,
                "rating_b": 6.0 if better == "B" else 3.0, "reason": "length"}


def test_annotate_job_on_multi_turn_prompts(tmp_path):
    """The job end to end on a tiny random policy: multi-turn prompts are sampled with their
    earlier turns, judged as conversations, and written as messages lists."""
    save_params(str(tmp_path / "ckpt"), CFG, llama.init_params(CFG, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    suite = synthetic.write_suite(str(tmp_path / "data"), seed=0, num_prompts=60)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(open(suite["prompts_test"]).readlines()[:2]
                               + open(suite["prompts_multiturn_test"]).readlines()[:2]))
    judge, out = OrderJudge(), tmp_path / "out"
    summary = jobs.run(lambda: pairs_lib.annotate_job(
        str(prompts), str(out), CFG, judge, ckpt_dir=str(tmp_path / "ckpt"), max_new_tokens=8,
        batch_size=4, temperature=1.0, partitioner=Partitioner({"data": 1, "fsdp": 1,
                                                                "tensor": 1})), str(out))
    read = formats.read_prompts(str(prompts)).records
    assert [len(p.conversation.messages) for p in read] == [1, 1, 3, 3]
    asked = {p if isinstance(p, str) else p.messages for p in judge.asked}
    assert asked == {read[0].text, read[1].text, read[2].conversation.messages,
                     read[3].conversation.messages}
    pairs = formats.read_pairs(summary["pairs_file"]).records
    assert len(pairs) == summary["pairs"] > 0
    for pair in pairs:
        assert pair.prompt.messages in {p.conversation.messages for p in read}
    multi = [json.loads(line)["prompt"] for line in open(summary["pairs_file"])
             if isinstance(json.loads(line)["prompt"], list)]
    assert multi and all(len(m) == 3 for m in multi)


def test_the_quickstart_annotates_a_share_of_multi_turn_prompts(tmp_path):
    from xwin_jax import pipeline

    summary = pipeline.data_stage(str(tmp_path), num_prompts=600, annotate_prompts=160,
                                  rejection_prompts=64, eval_prompts=64)
    paths = summary["paths"]
    annotate = formats.read_prompts(paths["annotate_prompts"]).records
    multi = [p for p in annotate if len(p.conversation.messages) == 3]
    assert len(annotate) == 160 and len(multi) == summary["annotate_multiturn_prompts"] == 20
    single = [p.text for p in annotate if len(p.conversation.messages) == 1]
    assert single == [p.text for p in formats.read_prompts(paths["prompts_train"])][:140]
    assert not {p.conversation.messages[0].content for p in multi} & set(single)
    judge = synthetic.RuleJudge()  # every multi-turn prompt is one the rule judge verifies
    assert all(synthetic.solve_conversation(p.conversation) for p in multi)
    assert judge.rate(multi[0].conversation, "no answer").score == 1
    for name in ("rejection_prompts", "held_out_prompts"):  # single-turn: evaluation, RS, PPO
        assert all(len(p.conversation.messages) == 1
                   for p in formats.read_prompts(paths[name]))
