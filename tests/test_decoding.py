"""The decode layout: the same greedy tokens as the training layout, no weight all-gathers in
the compiled decode loop, and Partitioner.decoding's mesh and weight shardings."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xwin_jax import hlo, sampling
from xwin_jax.decoding import Decoder, DecodeLayout
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import LlamaConfig
from xwin_jax.models.spec import LM, spec
from xwin_jax.partitioning import Partitioner

# 8 heads and 8 KV heads: every head axis splits over tensor=8. Scanned layers, so the decode
# loop nests the layer loop (what a real model compiles to).
CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=8, num_kv_heads=8, max_seq_len=64, dtype="float32")
BATCH, PROMPT, NEW = 8, 12, 8


def _prompts():
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, CFG.vocab_size, (BATCH, PROMPT)).astype(np.int32)
    mask = np.ones_like(tokens)
    for row, pad in enumerate([0, 3, 0, 5, 1, 0, 7, 2]):  # left padding, rows of every length
        tokens[row, :pad], mask[row, :pad] = 0, 0
    return tokens, mask


@functools.lru_cache(maxsize=None)
def _host_params():
    """fp32 params from numpy (a flax init costs more than the rest of a test on 2 cores):
    std 0.15 matrices, unit norm scales."""
    rng = np.random.RandomState(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: np.ones(s.shape, np.float32) if path[-1].key == "scale"
        else (rng.standard_normal(s.shape) * 0.15).astype(np.float32), spec(LM).shapes(CFG))


@functools.lru_cache(maxsize=None)
def _training(mesh: tuple, dtype: str):
    """(cfg, training partitioner, fp32 params in the training layout)."""
    cfg = CFG.replace(dtype=dtype)
    part = Partitioner(dict(mesh))
    return cfg, part, jax.device_put(_host_params(), spec(LM).shardings(cfg, part))


@pytest.mark.parametrize("mesh,dtype", [
    ((("fsdp", 8),), "float32"),
    ((("fsdp", 8),), "bfloat16"),
    ((("fsdp", 4), ("tensor", 2)), "float32"),
])
def test_decode_layout_generates_the_training_layouts_greedy_tokens(mesh, dtype):
    cfg, part, params = _training(mesh, dtype)
    tokens, mask = _prompts()
    before = sampling.generate(params, cfg, tokens, mask, jax.random.key(0),
                               max_new_tokens=NEW, stop_ids=(-1,), partitioner=part)
    decoder = Decoder.create(cfg, part)
    assert decoder.partitioner.sizes == {"data": 1, "fsdp": 1, "tensor": 8}
    weights = decoder.weights(params)
    after = decoder.generate(weights, tokens, mask, jax.random.key(0), max_new_tokens=NEW,
                             stop_ids=(-1,))
    # Exact, bf16 included: both layouts compute in the same dtype from the same bf16-rounded
    # weights; only the summation order of the tensor-split contractions differs, which does
    # not move an argmax of these logits.
    np.testing.assert_array_equal(after.tokens, before.tokens)
    np.testing.assert_array_equal(after.lengths, before.lengths)
    np.testing.assert_allclose(after.logprobs, before.logprobs,
                               atol=1e-4 if dtype == "float32" else 5e-2)


def test_the_reshard_accepts_a_training_mesh_in_topology_order():
    """A TPU mesh lists its devices in a ring order, not by id; the decode mesh is by
    (process, id). The move between them is a device_put, which any order allows."""
    devices = jax.devices()
    part = Partitioner({"fsdp": 8}, devices=[devices[i] for i in (0, 2, 1, 3, 7, 6, 5, 4)])
    params = jax.device_put(_host_params(), spec(LM).shardings(CFG, part))
    tokens, mask = _prompts()
    before = sampling.generate(params, CFG, tokens, mask, jax.random.key(0),
                               max_new_tokens=NEW, stop_ids=(-1,), partitioner=part)
    decoder = Decoder.create(CFG, part)
    after = decoder.generate(decoder.weights(params), tokens, mask, jax.random.key(0),
                             max_new_tokens=NEW, stop_ids=(-1,))
    np.testing.assert_array_equal(after.tokens, before.tokens)


def _compiled_generate(params, cfg, part):
    """sampling.generate's real program, lowered with its inputs placed by `part` as
    sampling.generate places them, and compiled."""
    tokens, mask = _prompts()
    tokens, mask, row_keys, settings, static = sampling._inputs(
        cfg, tokens, mask, jax.random.key(0), 0.0, 0, 1.0, (2,), 0)
    placed = part.put_global_batch({"tokens": tokens, "mask": mask,
                                    "keys": np.asarray(jax.random.key_data(row_keys)),
                                    **settings._asdict()})
    with part.activation_context():
        return sampling.generate_program.lower(
            params, placed["tokens"], placed["mask"], jax.random.wrap_key_data(placed["keys"]),
            sampling.Settings(*(placed[n] for n in sampling.Settings._fields)),
            max_new_tokens=NEW, **static).compile()


def _smallest_weight_shard_bytes(*trees):
    """Bytes of the smallest weight matrix's smallest per-device shard (one layer's, for
    stacked layers), over the given trees of placed or abstract weights."""
    sizes = []
    for tree in trees:
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if x.ndim < 2 or path[-1].key == "scale":
                continue
            shard = x.sharding.shard_shape(x.shape)
            layers = shard[0] if any(getattr(k, "key", None) == "layers" for k in path) else 1
            sizes.append(int(np.prod(shard)) // layers * np.dtype(x.dtype).itemsize)
    return min(sizes)


def test_compiled_decode_loop_gathers_no_weights_in_the_decode_layout():
    cfg, part, params = _training((("fsdp", 8),), "bfloat16")
    decoder = Decoder.create(cfg, part)
    weights = decoder.weights(params)
    threshold = _smallest_weight_shard_bytes(params, weights)

    def loop_gathers(compiled):
        text = compiled if isinstance(compiled, str) else compiled.as_text()
        return [c for c in hlo.collectives(text)
                if c.op == "all-gather" and c.inside_loop]

    training = loop_gathers(_compiled_generate(params, cfg, part))
    decode_text = _compiled_generate(weights, cfg, decoder.partitioner).as_text()
    decode = loop_gathers(decode_text)
    # The training layout gathers every layer's weights inside the loops (so this test can
    # fail); the decode layout only gathers activations (the [B, tensor] argmax candidates).
    assert any(c.nbytes >= threshold for c in training), [c.shapes for c in training]
    assert not [c for c in decode if c.nbytes >= threshold], \
        [(c.name, c.shapes) for c in decode if c.nbytes >= threshold]
    # The decode loop (no known trip count) holds the layer loop (2 trips).
    loops = hlo.loops(decode_text)
    assert sorted(lp.trip_count or 0 for lp in loops) == [0, 2, 2]  # prefill's layers too
    decode_loop = next(lp for lp in loops if lp.trip_count is None)
    assert any(lp.computation == decode_loop.body for lp in loops)


def test_hlo_parser_on_a_hand_written_module():
    text = """HloModule m, entry_computation_layout={()->f32[]}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ag = f32[16,8]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  %ags = (bf16[2,8]{1,0}, bf16[8,8]{1,0}) all-gather-start(%y), channel_id=2, dimensions={0}
  %agd = bf16[8,8]{1,0} all-gather-done(%ags)
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %x)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %ar = pred[] all-reduce(%c), channel_id=3, to_apply=%or
}

%outer (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[4,8]{1,0}) while(%p), condition=%cond, body=%body, TRIP
}

ENTRY %main () -> f32[] {
  %rs = f32[2,8]{1,0} reduce-scatter(%a), channel_id=4, dimensions={0}, to_apply=%add
  %w2 = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond2, body=%outer, META
  ROOT %r = f32[] constant(0)
}
""".replace("TRIP", 'backend_config={"known_trip_count":{"n":"3"}}').replace(
        "META", 'metadata={op_name="jit(f)/while"}')
    found = {c.name: c for c in hlo.collectives(text)}
    assert set(found) == {"ag", "ags", "ar", "rs"}
    assert found["ag"].shapes == (("f32", (16, 8)),) and found["ag"].nbytes == 16 * 8 * 4
    assert found["ags"].nbytes == 8 * 8 * 2  # the output half of the start's tuple
    assert found["rs"].loops == () and not found["rs"].inside_loop
    assert [lp.name for lp in found["ag"].loops] == ["w2", "w"]
    outer, inner = found["ag"].loops
    assert (outer.trip_count, outer.op_name, inner.trip_count) == (None, "jit(f)/while", 3)
    assert found["ag"].executions_within(outer) == 3
    assert found["ag"].executions_within() is None  # the outer loop's count is unknown
    assert found["ar"].inside_loop  # a loop condition runs every iteration too
    per_step = hlo.total_bytes([c for c in found.values() if c.inside_loop], per=outer)
    assert per_step["all-gather"] == {"f32": 3 * 512, "bf16": 3 * 128}
    assert hlo.collective_bytes(text, inside_loops=True)["all-gather"] == {"f32": 512,
                                                                          "bf16": 128}
    assert hlo.collective_bytes(text)["reduce-scatter"] == {"f32": 64}


def test_decoding_mesh_defaults_to_every_device_of_the_host():
    part = Partitioner({"fsdp": 8})
    decode = part.decoding()
    assert decode.sizes == {"data": 1, "fsdp": 1, "tensor": 8}
    assert set(decode.mesh.devices.flat) == set(part.mesh.devices.flat)
    # A smaller training mesh: the decode layout stays on its devices.
    small = Partitioner({"data": 1, "fsdp": 4, "tensor": 1})
    assert small.decoding().sizes == {"data": 1, "fsdp": 1, "tensor": 4}
    assert set(small.decoding().mesh.devices.flat) == set(small.mesh.devices.flat)
    assert part.decoding(2).sizes == {"data": 4, "fsdp": 1, "tensor": 2}
    assert Decoder.create(CFG, part, DecodeLayout(tensor=4)).partitioner.sizes == {
        "data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ConfigError, match="tensor=3 does not divide the 8 devices"):
        part.decoding(3)


def test_the_default_tensor_divides_the_kv_heads():
    """tensor=0 is this host's devices capped to a divisor of the KV heads: 2 KV heads on 8
    devices decode at tensor 2 over 4 copies, so the K/V projections split too."""
    decoder = Decoder.create(CFG.replace(num_kv_heads=2), Partitioner({"fsdp": 8}))
    assert decoder.partitioner.sizes == {"data": 4, "fsdp": 1, "tensor": 2}
    k_proj = decoder.shardings["layers"]["attention"]["k_proj"]["kernel"].spec
    assert "tensor" in tuple(k_proj)
    assert Decoder.create(CFG.replace(num_kv_heads=2), Partitioner({"fsdp": 8}),
                          DecodeLayout(8)).partitioner.sizes["tensor"] == 8


def test_decode_layout_weights_are_in_the_compute_dtype_split_along_wide_axes():
    cfg = CFG.replace(dtype="bfloat16")
    decoder = Decoder.create(cfg, Partitioner({"fsdp": 8}))
    abstract = decoder.abstract_weights()
    layers = abstract["layers"]
    expected = {
        ("embed_tokens", "embedding"): P("tensor", None),  # [vocab, embed]
        ("lm_head", "kernel"): P(None, "tensor"),  # [embed, vocab]
        ("attention", "q_proj"): P(None, None, "tensor", None),  # [layers, embed, heads, hd]
        ("attention", "k_proj"): P(None, None, "tensor", None),
        ("attention", "o_proj"): P(None, "tensor", None, None),  # [layers, heads, hd, embed]
        ("mlp", "gate_proj"): P(None, None, "tensor"),  # [layers, embed, mlp]
        ("mlp", "down_proj"): P(None, "tensor", None),  # [layers, mlp, embed]
    }
    for (outer, inner), want in expected.items():
        leaf = (abstract[outer][inner] if outer in abstract
                else layers[outer][inner]["kernel"])
        assert leaf.dtype == np.dtype("bfloat16"), (outer, inner)
        assert leaf.sharding.spec == want, (outer, inner, leaf.sharding.spec)
    for norm in (abstract["final_norm"]["scale"], layers["input_norm"]["scale"],
                 layers["post_attention_norm"]["scale"]):
        assert norm.dtype == np.dtype("float32")
        assert all(axis is None for axis in norm.sharding.spec)
    # The real weights() agrees with the abstract plan, leaf by leaf, and holds the values.
    params = _training((("fsdp", 8),), "bfloat16")[2]
    weights = decoder.weights(params)
    for real, planned, source in zip(jax.tree.leaves(weights), jax.tree.leaves(abstract),
                                     jax.tree.leaves(params)):
        assert (real.dtype, real.shape) == (planned.dtype, planned.shape)
        assert real.sharding.is_equivalent_to(planned.sharding, real.ndim)
        np.testing.assert_array_equal(np.asarray(real),
                                      np.asarray(source).astype(planned.dtype))
