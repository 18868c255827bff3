"""The Xwin chat template: golden text, exact loss masks, truncation, both vocabularies."""

import pytest

from xwin_jax.data.formats import ASSISTANT, SYSTEM, USER, Conversation, Message
from xwin_jax.data.template import (XWIN_SYSTEM, TruncationStats, render_text,
                                    tokenize_conversation, tokenize_prompt)
from xwin_jax.data.vocabulary import ByteVocabulary, SentencePieceVocabulary

TWO_TURNS = Conversation((Message(USER, "Hi!"), Message(ASSISTANT, "Hello."),
                          Message(USER, "Who are you?"), Message(ASSISTANT, "I am Xwin-LM.")))
GOLDEN = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions. "
          "USER: Hi! ASSISTANT: Hello.</s>USER: Who are you? ASSISTANT: I am Xwin-LM.</s>")
BYTES = ByteVocabulary()


def as_text(vocab, ids):
    """Decode with BOS dropped and EOS spelled </s>."""
    out, run = [], []
    for i in ids:
        if i == vocab.eos_id:
            out.append(vocab.decode(run) + "</s>")
            run = []
        elif i != vocab.bos_id:
            run.append(i)
    return "".join(out) + vocab.decode(run)


def test_golden_text_of_two_turns():
    assert render_text(TWO_TURNS) == GOLDEN
    with_system = Conversation((Message(SYSTEM, "Be terse."),) + TWO_TURNS.messages)
    assert render_text(with_system).startswith("Be terse. USER: Hi! ASSISTANT:")
    assert render_text(TWO_TURNS, system="Override.").startswith("Override. USER: Hi!")


def test_token_ids_spell_the_golden_text_and_mask_covers_answers_and_eos():
    result = tokenize_conversation(TWO_TURNS, BYTES)
    assert result.ids[0] == BYTES.bos_id
    assert as_text(BYTES, result.ids) == GOLDEN
    masked = [i for i, m in zip(result.ids, result.loss_mask) if m]
    assert as_text(BYTES, masked) == " Hello.</s> I am Xwin-LM.</s>"
    assert result.ids.count(BYTES.eos_id) == 2
    assert all(m == 1 for i, m in zip(result.ids, result.loss_mask) if i == BYTES.eos_id)
    assert BYTES.pad_id != BYTES.eos_id


def test_generation_prompt_ends_with_assistant_colon():
    prompt = Conversation(TWO_TURNS.messages[:3])
    ids = tokenize_prompt(prompt, BYTES)
    assert as_text(BYTES, ids) == render_text(prompt, add_generation_prompt=True)
    assert as_text(BYTES, ids).endswith("USER: Who are you? ASSISTANT:")
    # The prompt is exactly the prefix of the tokenized full conversation.
    full = tokenize_conversation(TWO_TURNS, BYTES).ids
    assert full[:len(ids)] == ids
    with pytest.raises(ValueError, match="must end with a user message"):
        tokenize_prompt(TWO_TURNS, BYTES)


def test_truncation_policies_and_stats():
    full = tokenize_conversation(TWO_TURNS, BYTES)
    first_exchange = len(tokenize_conversation(Conversation(TWO_TURNS.messages[:2]), BYTES).ids)
    dropped = tokenize_conversation(TWO_TURNS, BYTES, max_len=first_exchange + 5)
    assert dropped.dropped_turns == 1 and len(dropped.ids) == first_exchange
    assert as_text(BYTES, dropped.ids).endswith("ASSISTANT: Hello.</s>")
    cut = tokenize_conversation(TWO_TURNS, BYTES, max_len=first_exchange + 5,
                                truncation="truncate")
    assert cut.truncated and cut.ids == full.ids[:first_exchange + 5]
    assert tokenize_conversation(TWO_TURNS, BYTES, max_len=20) is None  # no answer token left
    stats = TruncationStats()
    for result in (full, dropped, None):
        stats.add(result)
    assert (stats.examples, stats.truncated_examples, stats.dropped_turns,
            stats.dropped_examples) == (3, 1, 1, 1)
    assert "1 dropped" in stats.report()


def test_sentencepiece_vocabulary_trained_here_round_trips(tmp_path):
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([GOLDEN, XWIN_SYSTEM] + [
        f"USER: what is {a} plus {b}? ASSISTANT: {a + b}" for a in range(30) for b in range(7)]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    vocab = SentencePieceVocabulary(str(tmp_path / "sp.model"))
    assert (vocab.bos_id, vocab.eos_id, vocab.pad_id) == (1, 2, 0)
    text = "Who are you? I am Xwin-LM, 42 ünïcödé."
    assert vocab.decode(vocab.encode(text)) == text
    result = tokenize_conversation(TWO_TURNS, vocab)
    masked = [i for i, m in zip(result.ids, result.loss_mask) if m]
    assert vocab.decode([i for i in masked if i != vocab.eos_id]) == "Hello. I am Xwin-LM."
    assert masked.count(vocab.eos_id) == 2 and result.ids[0] == vocab.bos_id


def test_a_conversations_own_system_message_wins_over_a_default():
    own = Conversation((Message(SYSTEM, "Mine."), Message(USER, "Hi!")))
    assert render_text(own, system="Default.").startswith("Mine. USER: Hi!")
    assert render_text(Conversation(own.messages[1:]), system="Default.").startswith(
        "Default. USER: Hi!")
    no_system = Conversation((Message(SYSTEM, ""), Message(USER, "Hi!")))
    assert render_text(no_system) == "USER: Hi!"
    ids = tokenize_prompt(no_system, BYTES)
    assert as_text(BYTES, ids) == "USER: Hi! ASSISTANT:"
