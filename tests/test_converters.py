"""Pairs and prompts as arrays: response masks, padding, and positions from the mask."""

import numpy as np
import pytest

from xwin_jax.data.converters import pairs_batch, prompts_batch
from xwin_jax.data.formats import ASSISTANT, USER, Conversation, Message, PreferencePair
from xwin_jax.data.vocabulary import ByteVocabulary

VOCAB = ByteVocabulary()
PROMPT = Conversation((Message(USER, "Hi"), Message(ASSISTANT, "Hello."),
                       Message(USER, "What is 2 + 2?")))


def test_pairs_mask_only_the_final_response_and_eos():
    pair = PreferencePair(PROMPT, "The answer is 4.", "No idea.", 9.0, None)
    batch = pairs_batch([pair], VOCAB, seq_len=256)
    for side, text in (("chosen", " The answer is 4."), ("rejected", " No idea.")):
        tokens, mask = batch[f"{side}_tokens"][0], batch[f"{side}_response_mask"][0]
        response = tokens[mask > 0]
        assert response[-1] == VOCAB.eos_id and VOCAB.decode(response[:-1]) == text
        assert VOCAB.decode(tokens[tokens > 2]).endswith("ASSISTANT:" + text)
        assert (tokens[int(mask.nonzero()[0][-1]) + 1:] == VOCAB.pad_id).all()  # right-padded
    assert batch["chosen_rating"][0] == 9.0 and np.isnan(batch["rejected_rating"][0])


def test_long_pairs_lose_the_prompt_start_not_the_response():
    pair = PreferencePair(PROMPT, "The answer is 4.", "No.")
    batch = pairs_batch([pair], VOCAB, seq_len=60)
    tokens, mask = batch["chosen_tokens"][0], batch["chosen_response_mask"][0]
    assert tokens[0] == VOCAB.bos_id and mask.sum() == len(" The answer is 4.") + 1
    assert tokens[-1] == VOCAB.eos_id
    with pytest.raises(ValueError, match="does not fit"):
        pairs_batch([pair], VOCAB, seq_len=10)


def test_prompts_are_left_padded_with_positions_from_the_mask():
    short = Conversation((Message(USER, "Hi"),))
    batch = prompts_batch([PROMPT, short], VOCAB, max_len=200)
    for row in range(2):
        mask = batch["mask"][row]
        first = int(mask.argmax())
        assert (mask[first:] == 1).all() and (mask[:first] == 0).all()
        assert (batch["tokens"][row, :first] == VOCAB.pad_id).all()
        assert batch["tokens"][row, first] == VOCAB.bos_id
        np.testing.assert_array_equal(batch["positions"][row, first:],
                                      np.arange(200 - first))
    assert VOCAB.decode(batch["tokens"][1][batch["tokens"][1] > 2]).endswith(
        "USER: Hi ASSISTANT:")


def test_a_pair_that_fits_exactly_after_dropping_the_prompt_is_kept():
    pair = PreferencePair(PROMPT, "ok", "no")
    answer = len(" ok") + 1
    batch = pairs_batch([pair], VOCAB, seq_len=answer + 1)  # BOS + response
    assert batch["chosen_tokens"][0, 0] == VOCAB.bos_id
    assert batch["chosen_response_mask"][0].sum() == answer
    assert batch["chosen_length"][0] == answer + 1
