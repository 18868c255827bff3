"""Reward-model head: last-real-token reading under either padding, and HF sequence
classification export with equal scores."""

import jax
import jax.numpy as jnp
import numpy as np

from xwin_jax.checkpoints import hf
from xwin_jax.models import heads, llama

CFG = llama.preset("tiny")
PARAMS = heads.init_reward_params(CFG, jax.random.key(0))
ROWS = [[1, 50, 60, 70, 80, 2], [1, 9, 2], [1, 33, 44, 55, 2]]


def padded(rows, left):
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        if left:
            tokens[r, width - len(row):] = row
        else:
            tokens[r, :len(row)] = row
    return tokens, (tokens != 0).astype(np.int32)


def score(tokens, mask, params=PARAMS):
    return np.asarray(heads.RewardModel(CFG).apply({"params": params}, jnp.asarray(tokens),
                                                   jnp.asarray(mask)))


def test_left_and_right_padding_give_the_same_reward():
    right, left = score(*padded(ROWS, left=False)), score(*padded(ROWS, left=True))
    alone = np.concatenate([score(np.asarray([r]), np.ones((1, len(r)))) for r in ROWS])
    np.testing.assert_allclose(right, alone, atol=1e-5)
    np.testing.assert_allclose(left, alone, atol=1e-5)
    assert np.abs(alone).max() > 1e-3 and len(set(np.round(alone, 5))) == 3


def test_head_init_std_and_trunk_reuse():
    kernel = np.asarray(PARAMS["score"]["kernel"])
    assert kernel.shape == (CFG.hidden_size, 1)
    assert abs(kernel.std() - 1 / np.sqrt(CFG.hidden_size + 1)) < 0.04
    lm = llama.init_params(CFG, jax.random.key(1))
    rm = heads.reward_params_from_trunk(lm, CFG, jax.random.key(2))
    assert "lm_head" not in rm["model"] and rm["model"]["embed_tokens"] is lm["embed_tokens"]
    assert score(*padded(ROWS, False), params=rm).shape == (3,)


def test_hf_export_loads_as_sequence_classification_with_equal_scores(tmp_path):
    import torch
    import transformers

    hf.save_hf(CFG, PARAMS, str(tmp_path), dtype="float32", head="score")
    model, info = transformers.LlamaForSequenceClassification.from_pretrained(
        str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, mask = padded(ROWS, left=False)
    with torch.no_grad():
        theirs = model.eval()(torch.as_tensor(tokens).long(),
                              attention_mask=torch.as_tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(score(tokens, mask), theirs, atol=1e-4)
    cfg, params = hf.load_hf(str(tmp_path), head="score", **CFG.runtime_fields())
    assert cfg == CFG
    jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
