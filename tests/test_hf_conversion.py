"""HF ↔ ours conversion: round trips through transformers, shards, .bin files, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits, make_hf_model
from xwin_jax.checkpoints import hf
from xwin_jax.checkpoints.params import load_checkpoint_vocabulary, save_params
from xwin_jax.checkpoints.safetensors_io import CheckpointError, SafetensorsReader
from xwin_jax.data import vocabulary
from xwin_jax.errors import ConfigError
from xwin_jax.models.config import UnsupportedConfigError
from xwin_jax.models.llama import Llama, init_params, preset

TOKENS = np.random.default_rng(1).integers(0, 97, size=(2, 17))


def load_with_transformers(path, **kwargs):
    import transformers
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def test_hf_to_ours_to_hf_sharded_round_trip(hf_model_dir, tmp_path):
    path, model = hf_model_dir()
    cfg, params = hf.load_hf(path, dtype="float32")
    out = str(tmp_path / "export")
    files = hf.save_hf(cfg, params, out, dtype="float32", max_shard_size="60KB")
    assert len(files) >= 2
    index = json.load(open(os.path.join(out, hf.SAFETENSORS_INDEX)))
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    reloaded = load_with_transformers(out)
    # fp32 all the way: the re-exported model must be bit-identical in its outputs.
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS))


@pytest.mark.parametrize("tied", [False, True])
def test_ours_to_hf_to_ours_is_exact(tmp_path, tied):
    cfg = preset("tiny", tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.key(3))
    hf.save_hf(cfg, params, str(tmp_path / "hf"), dtype="float32")
    cfg2, params2 = hf.load_hf(str(tmp_path / "hf"), dtype=cfg.dtype, scan_layers=False)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    reloaded = load_with_transformers(str(tmp_path / "hf"))
    tokens = np.arange(30).reshape(2, 15)
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=1e-4, rtol=0)


def test_bfloat16_export_loads_in_transformers(tmp_path):
    import torch
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    hf.save_hf(cfg, params, str(tmp_path / "hf"))  # bf16 is the default
    reader = SafetensorsReader(str(tmp_path / "hf" / hf.SAFETENSORS_FILE))
    assert reader.get("model.norm.weight").dtype.name == "bfloat16"
    model = load_with_transformers(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = np.asarray(params["embed_tokens"]["embedding"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().float().numpy(),
                                  expected.astype(np.float32))


def _write_bin(model, path):
    """A legacy pytorch_model.bin directory (transformers 5 no longer writes one itself)."""
    import torch
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), os.path.join(path, hf.TORCH_FILE))


def test_pytorch_bin_checkpoint(tmp_path):
    model = make_hf_model()
    _write_bin(model, tmp_path)
    cfg, params = hf.load_hf(str(tmp_path), dtype="float32")
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(ours, hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    _write_bin(make_hf_model(), tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*needs PyTorch"):
        hf.load_hf(str(tmp_path))


# --- bad input -------------------------------------------------------------------------------

def _rewrite_config(path, **changes):
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(changes)
    json.dump(config, open(config_path, "w"))
    return config_path


def _rewrite_weights(path, drop=(), add=None):
    from safetensors.numpy import save_file
    file = os.path.join(path, hf.SAFETENSORS_FILE)
    reader = SafetensorsReader(file)
    tensors = {k: np.array(reader.get(k)) for k in reader.keys() if k not in drop}
    tensors.update(add or {})
    del reader
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_missing_tensor_is_named(hf_model_dir):
    path, _ = hf_model_dir()
    _rewrite_weights(path, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf.load_hf(path)


def test_wrong_shape_names_tensor_and_file(hf_model_dir):
    path, _ = hf_model_dir()
    _rewrite_config(path, intermediate_size=128)
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj"
                             r"\.weight' has shape \[96, 64\], expected \[128, 64\]"):
        hf.load_hf(path)


def test_unexpected_tensor_is_named(hf_model_dir):
    path, _ = hf_model_dir()
    _rewrite_weights(path, add={"model.layers.0.self_attn.q_proj.bias":
                                np.zeros(64, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*q_proj\.bias"):
        hf.load_hf(path)


@pytest.mark.parametrize("field,value", [
    ("architectures", ["MistralForCausalLM"]),
    ("model_type", "mistral"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
])
def test_unsupported_config_field_is_named(hf_model_dir, field, value):
    path, _ = hf_model_dir()
    config_path = _rewrite_config(path, **{field: value})
    with pytest.raises(UnsupportedConfigError) as err:
        hf.load_hf(path)
    assert config_path in str(err.value) and repr(field) in str(err.value)


def test_missing_weights_and_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        hf.load_hf(str(tmp_path))
    make_hf_model().config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"no weights found"):
        hf.load_hf(str(tmp_path))


def test_corrupt_safetensors_header(hf_model_dir):
    path, _ = hf_model_dir()
    with open(os.path.join(path, hf.SAFETENSORS_FILE), "r+b") as f:
        f.write(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        hf.load_hf(path)


def test_parse_size():
    assert hf.parse_size("5GB") == 5 * 10**9
    assert hf.parse_size("2GiB") == 2 * 2**30
    assert hf.parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        hf.parse_size("lots")


def test_invalid_values_name_the_config_file(hf_model_dir):
    path, _ = hf_model_dir()
    config_path = _rewrite_config(path, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=rf"{config_path}: .*num_kv_heads=3"):
        hf.load_hf(path)
    _rewrite_config(path, num_key_value_heads=2, rope_scaling="linear")
    with pytest.raises(UnsupportedConfigError, match=r"'rope_scaling' = 'linear'"):
        hf.load_hf(path)


def test_load_hf_reads_a_sharded_index_and_keeps_unrelated_files(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(5))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "training_args.bin").write_bytes(b"keep me")
    hf.save_hf(cfg, params, str(out), dtype="float32", max_shard_size="100KB")
    assert (out / hf.SAFETENSORS_INDEX).exists() and (out / "training_args.bin").exists()
    cfg2, params2 = hf.load_hf(str(out), **cfg.runtime_fields())
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    hf.save_hf(cfg, params, str(out), dtype="float32")  # re-export unsharded over it
    assert not (out / hf.SAFETENSORS_INDEX).exists() and (out / "training_args.bin").exists()
    assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]


# --- the tokenizer travels --------------------------------------------------------------------

def _hf_dir_with_tokenizer(tmp_path, kind):
    """A tiny random HF Llama saved beside its tokenizer: 'sentencepiece' (tokenizer.model and
    a LlamaTokenizer config, as Llama-2 on the hub) or 'tokenizer_json' (tokenizer.json and
    tokenizer_config.json only, as transformers' LlamaTokenizer saves them)."""
    from test_vocabulary import train_sentencepiece, write_llama_tokenizer_dir
    sp_file = train_sentencepiece(str(tmp_path / "sp"))
    path = str(tmp_path / "hf")
    if kind == "sentencepiece":
        os.makedirs(path)
        os.replace(sp_file, os.path.join(path, vocabulary.TOKENIZER_MODEL))
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": None, "legacy": False},
                  open(os.path.join(path, vocabulary.TOKENIZER_CONFIG), "w"))
    else:
        write_llama_tokenizer_dir(sp_file, path)
    make_hf_model(vocab_size=400).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer_json"])
def test_import_and_export_carry_the_tokenizer(tmp_path, kind, capsys):
    from test_vocabulary import TEXTS, assert_same_ids
    hf_dir = _hf_dir_with_tokenizer(tmp_path, kind)
    source = vocabulary.load_vocabulary(hf_dir)
    assert source.kind == {"sentencepiece": "sentencepiece",
                           "tokenizer_json": "hf_tokenizer"}[kind]
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    assert hf.convert("import", hf_dir, ckpt)["vocabulary"] == source.kind
    record = json.load(open(os.path.join(ckpt, vocabulary.VOCABULARY_FILE)))
    assert record["kind"] == source.kind and record["vocab_size"] == 400
    assert all(os.path.exists(os.path.join(ckpt, f)) for f in record["files"])
    assert load_checkpoint_vocabulary(ckpt) == source

    hf.convert("export", out, ckpt, dtype="float32")
    assert "warning" not in capsys.readouterr().out
    assert vocabulary.load_vocabulary(out) == source
    tok = assert_same_ids(source, out, TEXTS + ["Ελληνικά γράμματα", " 12 plus 30"])
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    config = json.load(open(os.path.join(out, hf.CONFIG_FILE)))
    generation = json.load(open(os.path.join(out, vocabulary.GENERATION_CONFIG)))
    for ids in (config, generation):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, 2, 0)
    load_with_transformers(out)  # the weights still load with no missing/unexpected keys


def test_byte_vocabulary_exports_a_tokenizer_autotokenizer_loads(tmp_path):
    from test_vocabulary import TEXTS, assert_same_ids
    cfg = preset("tiny")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    save_params(ckpt, cfg, init_params(cfg, jax.random.key(0)),
                vocabulary=vocabulary.ByteVocabulary())
    hf.convert("export", out, ckpt, dtype="float32")
    vocab = vocabulary.ByteVocabulary()
    tok = assert_same_ids(vocab, out, TEXTS + ["\x00\x7f control bytes", "ÿ"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("hi").input_ids == [1] + vocab.encode("hi")
    assert tok.decode(vocab.encode("Grüße 🎉")) == "Grüße 🎉"
    # Back in: the export imports with its vocabulary recorded.
    hf.convert("import", out, str(tmp_path / "again"))
    assert load_checkpoint_vocabulary(str(tmp_path / "again")) == vocab


def test_a_directory_without_tokenizer_still_converts(hf_model_dir, tmp_path, capsys):
    path, _ = hf_model_dir()
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    hf.convert("import", path, ckpt)
    assert f"note: {path} holds no tokenizer" in capsys.readouterr().out
    assert load_checkpoint_vocabulary(ckpt) is None
    hf.convert("export", out, ckpt, dtype="float32")
    assert f"warning: {ckpt} records no vocabulary" in capsys.readouterr().out
    assert not any(os.path.exists(os.path.join(out, f))
                   for f in (vocabulary.TOKENIZER_JSON, vocabulary.VOCABULARY_FILE))


def test_export_replaces_an_earlier_tokenizer(tmp_path):
    cfg = preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    out = tmp_path / "hf"
    from test_vocabulary import train_sentencepiece
    sp = vocabulary.get_vocabulary(train_sentencepiece(str(tmp_path / "sp")))
    hf.save_hf(cfg, params, str(out), dtype="float32", vocabulary=sp)
    assert (out / vocabulary.TOKENIZER_MODEL).exists()
    hf.save_hf(cfg, params, str(out), dtype="float32", vocabulary=vocabulary.ByteVocabulary())
    assert not (out / vocabulary.TOKENIZER_MODEL).exists()  # no stale SentencePiece model
    assert vocabulary.load_vocabulary(str(out)) == vocabulary.ByteVocabulary()


def test_import_refuses_a_tokenizer_larger_than_the_embedding(tmp_path):
    hf_dir = _hf_dir_with_tokenizer(tmp_path, "sentencepiece")
    _rewrite_config(hf_dir, vocab_size=300)
    _rewrite_weights(hf_dir, add={
        "model.embed_tokens.weight": np.zeros((300, 64), np.float32),
        "lm_head.weight": np.zeros((300, 64), np.float32)})
    with pytest.raises(ConfigError, match=r"has 400 ids but the model's embedding has 300"):
        hf.convert("import", hf_dir, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt" / "model_config.json")


def test_import_refuses_pad_equal_to_eos_naming_the_file(tmp_path):
    hf_dir = _hf_dir_with_tokenizer(tmp_path, "tokenizer_json")
    config_path = os.path.join(hf_dir, vocabulary.TOKENIZER_CONFIG)
    config = json.load(open(config_path))
    json.dump(dict(config, pad_token="</s>"), open(config_path, "w"))
    with pytest.raises(ConfigError, match=rf"{config_path}: pad_token '</s>' is the EOS token"):
        hf.convert("import", hf_dir, str(tmp_path / "ckpt"))
