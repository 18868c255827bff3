"""KV-cache generation against teacher-forced forward passes of the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xwin_jax import sampling
from xwin_jax.models import llama

CFG = llama.preset("tiny")
PARAMS = llama.init_params(CFG, jax.random.key(0))
PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 90, 91], [1, 7, 8, 9, 10]]


def left_padded(prompts):
    width = max(map(len, prompts))
    tokens = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, width - len(p):] = p
    return tokens, (tokens != 0).astype(np.int32)


def teacher_forced_logits(prompt, new_tokens, params=PARAMS, cfg=CFG):
    row = jnp.asarray([list(prompt) + list(new_tokens)])
    logits = llama.Llama(cfg).apply({"params": params}, row)[0]
    return np.asarray(logits[len(prompt) - 1:-1])  # the logits that chose each new token


def test_greedy_is_the_argmax_of_the_teacher_forced_pass_at_every_step():
    tokens, mask = left_padded(PROMPTS)
    out = sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(0), max_new_tokens=12,
                            stop_ids=(2,))
    for r, prompt in enumerate(PROMPTS):
        new = out.tokens[r, :out.lengths[r]]
        logits = teacher_forced_logits(prompt, new)
        np.testing.assert_array_equal(np.argmax(logits, -1), new)
        np.testing.assert_allclose(out.logprobs[r, :len(new)],
                                   jax.nn.log_softmax(logits)[np.arange(len(new)), new],
                                   atol=1e-5)


def test_sampled_logprobs_equal_teacher_forced_logprobs_with_temperature():
    tokens, mask = left_padded(PROMPTS)
    out = sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(3), max_new_tokens=10,
                            temperature=0.7, stop_ids=(2,))
    for r, prompt in enumerate(PROMPTS):
        new = out.tokens[r, :out.lengths[r]]
        expected = jax.nn.log_softmax(teacher_forced_logits(prompt, new) / 0.7)
        np.testing.assert_allclose(out.logprobs[r, :len(new)],
                                   np.asarray(expected)[np.arange(len(new)), new], atol=1e-5)


def test_a_left_padded_batch_equals_each_prompt_alone():
    tokens, mask = left_padded(PROMPTS)
    batch = sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(0), max_new_tokens=8)
    for r, prompt in enumerate(PROMPTS):
        alone = sampling.generate(PARAMS, CFG, np.asarray([prompt]), np.ones((1, len(prompt))),
                                  jax.random.key(0), max_new_tokens=8)
        np.testing.assert_array_equal(batch.tokens[r], alone.tokens[0])
        np.testing.assert_allclose(batch.logprobs[r], alone.logprobs[0], atol=1e-5)


def test_top_k_1_and_tiny_top_p_equal_greedy_and_keys_reproduce():
    tokens, mask = left_padded(PROMPTS)
    run = lambda key, **kw: sampling.generate(PARAMS, CFG, tokens, mask, key,  # noqa: E731
                                              max_new_tokens=8, **kw)
    greedy = run(jax.random.key(0)).tokens
    np.testing.assert_array_equal(run(jax.random.key(5), temperature=1.0, top_k=1).tokens, greedy)
    np.testing.assert_array_equal(run(jax.random.key(6), temperature=1.0, top_p=1e-6).tokens,
                                  greedy)
    first = run(jax.random.key(7), temperature=1.0)
    np.testing.assert_array_equal(run(jax.random.key(7), temperature=1.0).tokens, first.tokens)
    assert not np.array_equal(run(jax.random.key(8), temperature=1.0).tokens, first.tokens)


def test_generation_stops_at_eos_and_at_stop_ids():
    tokens, mask = left_padded(PROMPTS)
    free = sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(0), max_new_tokens=10)
    assert not free.finished.any() and (free.lengths == 10).all()
    stop = int(free.tokens[0, 3])  # make row 0's 4th token a stop token
    out = sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(0), max_new_tokens=10,
                            stop_ids=(2, stop))
    first_stop = int(np.argmax(free.tokens[0] == stop))
    assert out.finished[0] and out.lengths[0] == first_stop + 1
    assert (out.tokens[0, first_stop + 1:] == 0).all()
    assert (out.logprobs[0, first_stop + 1:] == 0).all()
    np.testing.assert_array_equal(out.tokens[0, :first_stop + 1], free.tokens[0, :first_stop + 1])
    # With only that token as the stop set, as EOS alone would be.
    eos = sampling.generate(PARAMS, CFG, tokens[:1], mask[:1], jax.random.key(0),
                            max_new_tokens=10, stop_ids=(stop,))
    assert eos.finished[0] and eos.lengths[0] == first_stop + 1
    # The response of a finished row leaves out its stop token; an unfinished row keeps all.
    np.testing.assert_array_equal(out.response_ids(0), free.tokens[0, :first_stop])
    np.testing.assert_array_equal(free.response_ids(1), free.tokens[1])


def test_scanned_layout_generates_the_same():
    tokens, mask = left_padded(PROMPTS)
    scanned_cfg = CFG.replace(scan_layers=True)
    scanned = llama.stack_layers(PARAMS, CFG.num_layers)
    a = sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(0), max_new_tokens=6)
    b = sampling.generate(scanned, scanned_cfg, tokens, mask, jax.random.key(0), max_new_tokens=6)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_filter_logits_against_numpy():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], np.float32))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()  # noqa: E731
    assert kept(sampling.filter_logits(jnp.asarray(logits), top_k=2)) == [1, 1, 0, 0, 0]
    # nucleus: the smallest set whose mass reaches p (0.5 + 0.2 >= 0.6)
    assert kept(sampling.filter_logits(jnp.asarray(logits), top_p=0.6)) == [1, 1, 0, 0, 0]
    assert kept(sampling.filter_logits(jnp.asarray(logits), top_p=0.5)) == [1, 0, 0, 0, 0]
    assert kept(sampling.filter_logits(jnp.asarray(logits), top_p=0.71)) == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(PARAMS, CFG, [[1]], [[1]], jax.random.key(0), max_new_tokens=1,
                          top_p=0.0)


def test_sharded_generation_equals_single_device():
    from xwin_jax.partitioning import Partitioner

    cfg = CFG.replace(scan_layers=True)
    params = llama.stack_layers(PARAMS, CFG.num_layers)
    tokens, mask = left_padded(PROMPTS + [[1, 3, 4]])  # 4 rows over data*fsdp = 4
    single = sampling.generate(params, cfg, tokens, mask, jax.random.key(0), max_new_tokens=6)
    part = Partitioner({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = part.shardings_for(llama.param_logical_axes(cfg), llama.param_shapes(cfg))
    sharded_params = jax.device_put(params, shardings)
    sharded = sampling.generate(sharded_params, cfg, tokens, mask, jax.random.key(0),
                                max_new_tokens=6, partitioner=part)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_filtering_is_by_rank_so_ties_do_not_widen_the_set():
    uniform = jnp.zeros((1, 8))
    assert int(jnp.isfinite(sampling.filter_logits(uniform, top_p=0.3)).sum()) == 3
    assert int(jnp.isfinite(sampling.filter_logits(uniform, top_k=2)).sum()) == 2
    both = sampling.filter_logits(jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]])), top_k=3,
                                  top_p=0.5)  # top-p renormalises within the top 3
    assert np.isfinite(np.asarray(both))[0].tolist() == [True, True, False, False]


def test_a_row_key_makes_a_sample_independent_of_its_batch_mates():
    tokens, mask = left_padded(PROMPTS)
    keys = jax.random.split(jax.random.key(11), 3)
    batch = sampling.generate(PARAMS, CFG, tokens, mask, keys, max_new_tokens=8,
                              temperature=1.0)
    alone = sampling.generate(PARAMS, CFG, np.asarray([PROMPTS[1]]),
                              np.ones((1, len(PROMPTS[1]))), keys[1:2], max_new_tokens=8,
                              temperature=1.0)
    np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])


def test_per_row_settings_each_sample_as_if_alone():
    """One batch mixing greedy, plain and filtered rows: each row is what its own settings
    give in a uniform batch with the same keys (tokens and log-probs)."""
    tokens, mask = left_padded(PROMPTS)
    keys = jax.random.split(jax.random.key(4), 3)
    settings = [dict(temperature=0.0), dict(temperature=0.9), dict(temperature=1.3, top_p=0.8,
                                                                   top_k=20)]
    mixed = sampling.generate(PARAMS, CFG, tokens, mask, keys, max_new_tokens=8,
                              **{name: [s.get(name, default) for s in settings] for name, default
                                 in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0))})
    for r, kwargs in enumerate(settings):
        uniform = sampling.generate(PARAMS, CFG, tokens, mask, keys, max_new_tokens=8, **kwargs)
        np.testing.assert_array_equal(mixed.tokens[r], uniform.tokens[r])
        np.testing.assert_allclose(mixed.logprobs[r], uniform.logprobs[r], atol=1e-6)
    # The greedy row is bit-identical to the greedy program (its plain log-softmax).
    greedy = sampling.generate(PARAMS, CFG, tokens, mask, keys, max_new_tokens=8)
    np.testing.assert_array_equal(mixed.logprobs[0], greedy.logprobs[0])
    # The filtered row's log-probs are those of the filtered distribution it sampled from.
    new = mixed.tokens[2, :mixed.lengths[2]]
    logits = jnp.asarray(teacher_forced_logits(PROMPTS[2], new)) / 1.3
    expected = jax.nn.log_softmax(sampling.filter_logits(logits, 20, 0.8))
    np.testing.assert_allclose(mixed.logprobs[2, :len(new)],
                               np.asarray(expected)[np.arange(len(new)), new], atol=1e-5)


def test_new_setting_values_compile_nothing():
    tokens, mask = left_padded(PROMPTS)
    run = lambda **kw: sampling.generate(PARAMS, CFG, tokens, mask, jax.random.key(0),  # noqa
                                         max_new_tokens=8, **kw)
    run(temperature=0.5), run(temperature=0.5, top_p=0.9)
    before = sampling.generate_program._cache_size()
    for i in range(1, 6):
        run(temperature=0.2 * i)
        run(temperature=[0.1 * i, 0.0, 1.0], top_p=[1.0 - 0.1 * i, 1.0, 0.5], top_k=[0, 0, i])
    assert sampling.generate_program._cache_size() == before


def test_sampling_mode_is_the_cheapest_exact_program():
    mode = lambda **kw: sampling.sampling_mode(sampling.row_settings(2, **kw), 512)  # noqa
    assert mode(temperature=0.0, top_p=0.5, top_k=3) == "greedy"  # greedy rows never filter
    assert mode(temperature=[0.0, 0.7]) == "sample"
    assert mode(temperature=[0.7, 0.0], top_k=[0, 5]) == "sample"  # only the greedy row filters
    assert mode(temperature=0.7, top_k=512) == "sample"  # top_k >= vocab is off
    assert mode(temperature=[0.0, 0.7], top_p=[1.0, 0.9]) == "filter"
    with pytest.raises(ValueError, match="temperature"):
        sampling.row_settings(2, temperature=[0.5, -1.0])


def test_filter_logits_per_row_equals_each_row_alone():
    logits = jax.random.normal(jax.random.key(2), (3, 16))
    top_k, top_p = [0, 4, 6], [0.5, 1.0, 0.7]
    rows = sampling.filter_logits(logits, jnp.asarray(top_k), jnp.asarray(top_p))
    for r in range(3):
        np.testing.assert_array_equal(rows[r],
                                      sampling.filter_logits(logits[r:r + 1], top_k[r],
                                                             top_p[r])[0])
    assert np.isfinite(np.asarray(rows)).sum(axis=1).tolist()[1:] == [4, 4]


def test_stream_yields_growing_chunks_that_end_as_generate():
    tokens, mask = left_padded(PROMPTS)
    keys = jax.random.split(jax.random.key(9), 3)
    kwargs = dict(max_new_tokens=8, temperature=[0.0, 1.0, 0.7], top_p=[1.0, 1.0, 0.9])
    whole = sampling.generate(PARAMS, CFG, tokens, mask, keys, **kwargs)
    parts = list(sampling.stream(PARAMS, CFG, tokens, mask, keys, chunk_tokens=3, **kwargs))
    assert [p.tokens.shape[1] for p in parts] == [1, 4, 7, 8]  # prefill, then 3 at a time
    for earlier, later in zip(parts, parts[1:]):
        np.testing.assert_array_equal(later.tokens[:, :earlier.tokens.shape[1]], earlier.tokens)
    np.testing.assert_array_equal(parts[-1].tokens, whole.tokens)
    np.testing.assert_array_equal(parts[-1].logprobs, whole.logprobs)
    np.testing.assert_array_equal(parts[-1].lengths, whole.lengths)
