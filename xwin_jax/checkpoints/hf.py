"""Hugging Face Llama checkpoints <-> our params, one tensor at a time.

    cfg, params = load_hf("path/to/hf_dir")               # config.json + safetensors (or .bin)
    save_hf(cfg, params, "out_dir", dtype="bfloat16")      # from_pretrained loads it

CLI:
    python -m xwin_jax.checkpoints.hf import --hf_dir D --out_dir O
    python -m xwin_jax.checkpoints.hf export --ckpt_dir O --hf_dir D2 [--dtype bfloat16]

The tokenizer travels both ways: import records the HF directory's tokenizer (tokenizer.json
or tokenizer.model with their config files) in the params checkpoint, export writes the
checkpoint's vocabulary into the HF directory, so `AutoTokenizer.from_pretrained` loads it.

Rotary is in the HF rotate-half layout on both sides, so every mapping below is a rename plus
reshape/transpose: no q/k permutation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Any, Callable, Iterator

import jax
import numpy as np

from xwin_jax.checkpoints.params import load_params, save_params
from xwin_jax.data import vocabulary as vocabulary_lib
from xwin_jax.checkpoints.safetensors_io import (CheckpointError, SafetensorsReader,
                                                 write_safetensors)
from xwin_jax.errors import ConfigError, UserError
from xwin_jax.models.config import LlamaConfig, UnsupportedConfigError
from xwin_jax.models.llama import LAYERS

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# The weight files of a model (not, say, training_args.bin or adapter_model.safetensors).
MODEL_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)")
# Buffers some exporters write that carry no weights (recomputed from the config).
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor ↔ one of our parameters. `{i}` in hf_name marks a per-layer tensor."""
    hf_name: str
    path: tuple[str, ...]  # inside the layer for per-layer tensors, else from the root
    hf_shape: Callable[[LlamaConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def _same(w, cfg):
    return w


def _transpose(w, cfg):
    return w.T


def _in_proj(heads_of):
    """HF [heads*head_dim, embed] ↔ ours [embed, heads, head_dim]."""
    return (lambda w, c: w.T.reshape(c.hidden_size, heads_of(c), c.head_dim),
            lambda w, c: w.reshape(c.hidden_size, heads_of(c) * c.head_dim).T)


_q_to_ours, _q_to_hf = _in_proj(lambda c: c.num_heads)
_kv_to_ours, _kv_to_hf = _in_proj(lambda c: c.num_kv_heads)

TENSOR_MAP: tuple[TensorMapping, ...] = (
    TensorMapping("model.embed_tokens.weight", ("embed_tokens", "embedding"),
                  lambda c: (c.vocab_size, c.hidden_size), _same, _same),
    TensorMapping("model.norm.weight", ("final_norm", "scale"),
                  lambda c: (c.hidden_size,), _same, _same),
    TensorMapping("lm_head.weight", ("lm_head", "kernel"),
                  lambda c: (c.vocab_size, c.hidden_size), _transpose, _transpose),
    TensorMapping("model.layers.{i}.input_layernorm.weight", ("input_norm", "scale"),
                  lambda c: (c.hidden_size,), _same, _same),
    TensorMapping("model.layers.{i}.self_attn.q_proj.weight", ("attention", "q_proj", "kernel"),
                  lambda c: (c.num_heads * c.head_dim, c.hidden_size), _q_to_ours, _q_to_hf),
    TensorMapping("model.layers.{i}.self_attn.k_proj.weight", ("attention", "k_proj", "kernel"),
                  lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), _kv_to_ours, _kv_to_hf),
    TensorMapping("model.layers.{i}.self_attn.v_proj.weight", ("attention", "v_proj", "kernel"),
                  lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size), _kv_to_ours, _kv_to_hf),
    TensorMapping("model.layers.{i}.self_attn.o_proj.weight", ("attention", "o_proj", "kernel"),
                  lambda c: (c.hidden_size, c.num_heads * c.head_dim),
                  lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
                  lambda w, c: w.reshape(c.num_heads * c.head_dim, c.hidden_size).T),
    TensorMapping("model.layers.{i}.post_attention_layernorm.weight",
                  ("post_attention_norm", "scale"), lambda c: (c.hidden_size,), _same, _same),
    TensorMapping("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"),
                  lambda c: (c.intermediate_size, c.hidden_size), _transpose, _transpose),
    TensorMapping("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up_proj", "kernel"),
                  lambda c: (c.intermediate_size, c.hidden_size), _transpose, _transpose),
    TensorMapping("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down_proj", "kernel"),
                  lambda c: (c.hidden_size, c.intermediate_size), _transpose, _transpose),
)


# A reward or value model: the trunk and a scalar head, as LlamaForSequenceClassification.
SCORE_MAPPING = TensorMapping("score.weight", ("score", "kernel"),
                              lambda c: (1, c.hidden_size), _transpose, _transpose)
HEADS = {"lm": "LlamaForCausalLM", "score": "LlamaForSequenceClassification"}


def expected_tensors(cfg: LlamaConfig, head: str = "lm"
                     ) -> Iterator[tuple[str, TensorMapping, int | None]]:
    """(HF name, mapping, layer index or None) for every tensor a checkpoint of cfg holds;
    head 'lm' (LlamaForCausalLM) or 'score' (LlamaForSequenceClassification, num_labels 1)."""
    if head not in HEADS:
        raise ConfigError(f"head={head!r}: choose one of {sorted(HEADS)}")
    if head == "score":
        yield SCORE_MAPPING.hf_name, SCORE_MAPPING, None
    for mapping in TENSOR_MAP:
        if mapping.hf_name == "lm_head.weight" and (cfg.tie_word_embeddings or head == "score"):
            continue
        if mapping.per_layer:
            for i in range(cfg.num_layers):
                yield mapping.hf_name.format(i=i), mapping, i
        else:
            yield mapping.hf_name, mapping, None


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- reading ----------------------------------------------------------------------------------

class _TorchBinReader:
    """A pytorch_model*.bin shard, read with torch.load(weights_only=True) (no pickle code)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError as err:
            raise CheckpointError(
                f"{path}: reading pytorch_model*.bin files needs PyTorch, which is not "
                f"installed (pip install torch); or re-save the checkpoint as safetensors"
            ) from err
        self.path = path
        self._torch = torch
        self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def keys(self):
        return list(self._state)

    def shape(self, name):
        return tuple(self._state[name].shape)

    def get(self, name):
        tensor = self._state[name]
        if tensor.dtype == self._torch.bfloat16:
            import ml_dtypes
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


class _WeightFiles:
    """name → reader over whichever of the four HF weight layouts the directory holds."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._readers: dict[str, Any] = {}
        self.location: dict[str, str] = {}  # tensor name → file
        for index_name, single_name, reader_cls in (
                (SAFETENSORS_INDEX, SAFETENSORS_FILE, SafetensorsReader),
                (TORCH_INDEX, TORCH_FILE, _TorchBinReader)):
            index_path = os.path.join(hf_dir, index_name)
            single_path = os.path.join(hf_dir, single_name)
            if os.path.exists(index_path):
                self._reader_cls = reader_cls
                self._read_index(index_path)
                return
            if os.path.exists(single_path):
                self._reader_cls = reader_cls
                for name in self._reader(single_path).keys():
                    self.location[name] = single_path
                return
        raise CheckpointError(
            f"{hf_dir}: no weights found; looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
            f"{TORCH_FILE} and {TORCH_INDEX}")

    def _read_index(self, index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: not a valid index ({err!r})") from err
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: field 'weight_map' must map tensor names "
                                  f"to files, got {type(weight_map).__name__}")
        for name, file in weight_map.items():
            path = os.path.join(self.hf_dir, file)
            if not os.path.exists(path):
                raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {file}, "
                                      f"which does not exist")
            self.location[name] = path

    def _reader(self, path):
        if path not in self._readers:
            self._readers[path] = self._reader_cls(path)
        return self._readers[path]

    def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.location:
            raise CheckpointError(f"{self.hf_dir}: tensor {name!r} is missing from the checkpoint")
        path = self.location[name]
        reader = self._reader(path)
        if name not in reader.keys():
            raise CheckpointError(f"{path}: tensor {name!r} is listed in the index but missing "
                                  f"from the file")
        shape = reader.shape(name)
        if shape != tuple(expected_shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, expected "
                                  f"{list(expected_shape)} from config.json")
        return reader.get(name)


def read_hf_config(hf_dir: str, **overrides) -> LlamaConfig:
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; {hf_dir} is not an HF model directory")
    try:
        with open(path) as f:
            hf_config = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return LlamaConfig.from_hf(hf_config, source=path, **overrides)
    except UnsupportedConfigError:
        raise
    except KeyError as err:
        raise CheckpointError(f"{path}: required field {err.args[0]!r} is missing") from err
    except (ValueError, TypeError) as err:  # e.g. heads not divisible by KV heads
        raise CheckpointError(f"{path}: {err}") from err


def load_hf(hf_dir: str, head: str = "lm", **config_overrides) -> tuple[LlamaConfig, dict]:
    """Reads an HF Llama directory into (config, host NumPy params) in our layout.

    `config_overrides` set fields HF configs do not carry (dtype, param_dtype, scan_layers,
    remat_policy, ...). Tensors are read one at a time from memory maps and written into
    preallocated arrays, so peak host memory is one copy of the model plus one tensor.
    head='score' reads a LlamaForSequenceClassification into the reward-model layout
    {"model": trunk, "score": {"kernel"}}.
    """
    cfg = read_hf_config(hf_dir, architectures=(HEADS[head],), **config_overrides)
    files = _WeightFiles(hf_dir)
    param_dtype = np.dtype(cfg.param_dtype)
    params: dict = {}
    expected = set()
    for name, mapping, layer in expected_tensors(cfg, head):
        expected.add(name)
        value = mapping.to_ours(files.get(name, mapping.hf_shape(cfg)), cfg).astype(param_dtype)
        if layer is None:
            _set_path(params, mapping.path, np.ascontiguousarray(value))
        elif cfg.scan_layers:
            path = (LAYERS,) + mapping.path
            if layer == 0:
                _set_path(params, path, np.empty((cfg.num_layers,) + value.shape, param_dtype))
            _get_path(params, path)[layer] = value
        else:
            _set_path(params, (f"{LAYERS}_{layer}",) + mapping.path, np.ascontiguousarray(value))
    unexpected = sorted(
        name for name in files.location
        if name not in expected and not IGNORED_HF_TENSORS.fullmatch(name)
        and not (name == "lm_head.weight" and cfg.tie_word_embeddings))
    if unexpected:
        raise CheckpointError(f"{hf_dir}: unexpected tensors for {cfg.num_layers}-layer "
                              f"{HEADS[head]}: {unexpected[:5]} "
                              f"({len(unexpected)} in all; "
                              f"first in {files.location[unexpected[0]]})")
    if head == "score":
        params = {"model": {k: v for k, v in params.items() if k != "score"},
                  "score": params["score"]}
    return cfg, params


# --- writing ----------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """5_000_000_000, "5GB" (decimal, as HF) or "4GiB" (binary) → bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ConfigError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _layer_of(params: dict, cfg: LlamaConfig, path: tuple[str, ...], layer: int):
    if LAYERS in params:
        return np.asarray(_get_path(params[LAYERS], path)[layer])
    return np.asarray(_get_path(params[f"{LAYERS}_{layer}"], path))


def _plan_shards(entries, max_bytes):
    shards, current, current_bytes = [], [], 0
    for entry in entries:
        size = int(np.prod(entry[1])) * entry[2].itemsize
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def save_hf(cfg: LlamaConfig, params: dict, hf_dir: str, *, dtype: str = "bfloat16",
            max_shard_size: int | str = "5GB", bos_token_id: int = 1, eos_token_id: int = 2,
            pad_token_id: int | None = None, head: str = "lm",
            vocabulary: Any = None) -> list[str]:
    """Writes `config.json` and safetensors (one file, or shards plus an index) that
    `transformers.LlamaForCausalLM.from_pretrained(hf_dir)` loads with no missing or
    unexpected keys. Params may be in either layer layout, NumPy or jax arrays; each tensor is
    converted just before it is written. head='score' writes a reward model (params
    {"model", "score"}) as LlamaForSequenceClassification with num_labels 1; it needs a
    pad_token_id (default 0), which HF uses to find each row's last real token. `vocabulary`
    (a data.vocabulary Vocabulary) writes its tokenizer files too, and its BOS/EOS/pad ids
    then replace bos_token_id/eos_token_id/pad_token_id in config.json and
    generation_config.json. Returns the weight files written."""
    out_dtype = np.dtype(dtype)
    if out_dtype.name not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"save_hf dtype={dtype!r}: choose float32, float16 or bfloat16")
    if jax.process_index() != 0:  # one writer; params must be addressable on host 0
        return []
    if vocabulary is not None:
        vocabulary = vocabulary_lib.get_vocabulary(vocabulary)
        bos_token_id, eos_token_id = vocabulary.bos_id, vocabulary.eos_id
        pad_token_id = vocabulary.pad_id
    if head == "score":
        params = {**params["model"], "score": params["score"]}
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    producers: dict[str, Callable[[], np.ndarray]] = {}
    entries = []
    for name, mapping, layer in expected_tensors(cfg, head):
        if layer is None:
            producers[name] = (lambda m=mapping: m.to_hf(np.asarray(_get_path(params, m.path)),
                                                          cfg))
        else:
            producers[name] = (lambda m=mapping, i=layer: m.to_hf(
                _layer_of(params, cfg, m.path, i), cfg))
        entries.append((name, mapping.hf_shape(cfg), out_dtype))
    shards = _plan_shards(entries, parse_size(max_shard_size))

    # Write into a sibling temporary directory and move it into place at the end, so a killed
    # export never leaves a directory that looks complete but is not.
    staging = hf_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    file_names = ([SAFETENSORS_FILE] if len(shards) == 1 else
                  [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                   for k in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(file_names, shards):
        total += write_safetensors(os.path.join(staging, file_name), shard,
                                   lambda name: producers[name](), {"format": "pt"})
        weight_map.update({name: file_name for name, _, _ in shard})
    if len(shards) > 1:
        with open(os.path.join(staging, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
        hf_config = cfg.to_hf(torch_dtype=out_dtype.name, bos_token_id=bos_token_id,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        hf_config["architectures"] = [HEADS[head]]
        if head == "score":
            hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        json.dump(hf_config, f, indent=2)
    generation_config = {}
    if vocabulary is not None:
        vocabulary.save(staging)
        generation_path = os.path.join(staging, vocabulary_lib.GENERATION_CONFIG)
        if os.path.exists(generation_path):  # the tokenizer's own (sampling defaults...)
            with open(generation_path) as f:
                generation_config = json.load(f)
    eos_ids = generation_config.get("eos_token_id")
    generation_config.update(bos_token_id=bos_token_id, pad_token_id=pad_token_id,
                             eos_token_id=(eos_ids if isinstance(eos_ids, list)
                                           and eos_token_id in eos_ids else eos_token_id))
    with open(os.path.join(staging, vocabulary_lib.GENERATION_CONFIG), "w") as f:
        json.dump(generation_config, f, indent=2)
    # Earlier model weights would shadow the new ones; an earlier tokenizer is replaced
    # whole when this export carries one.
    replaced = ({vocabulary_lib.VOCABULARY_FILE, *vocabulary_lib.TOKENIZER_FILES}
                if vocabulary is not None else set())
    if os.path.isdir(hf_dir):
        for stale in os.listdir(hf_dir):
            if MODEL_WEIGHT_FILE.fullmatch(stale) or stale in replaced or stale in (
                    SAFETENSORS_INDEX, TORCH_INDEX, CONFIG_FILE,
                    vocabulary_lib.GENERATION_CONFIG):
                os.remove(os.path.join(hf_dir, stale))
    os.makedirs(hf_dir, exist_ok=True)
    for file in os.listdir(staging):
        os.replace(os.path.join(staging, file), os.path.join(hf_dir, file))
    os.rmdir(staging)
    return file_names


# --- jobs and CLI -----------------------------------------------------------------------------

def convert(direction: str, hf_dir: str, ckpt_dir: str, *, dtype: str = "bfloat16",
            max_shard_size: int | str = "5GB", param_dtype: str = "float32",
            scan_layers: bool = True) -> dict:
    """The conversion job: 'import' (HF → params checkpoint) or 'export' (the reverse), with
    the tokenizer. It runs as a stage in its output directory (train/stage.py): converting
    the same source again is skipped, a changed source or setting is refused."""
    from xwin_jax.models.spec import open_checkpoint
    from xwin_jax.train.stage import run_stage

    if direction not in ("import", "export"):
        raise ConfigError(f"convert direction={direction!r}: choose 'import' or 'export'")
    source, target = (hf_dir, ckpt_dir) if direction == "import" else (ckpt_dir, hf_dir)
    what = "HF_DIR" if direction == "import" else "CKPT_DIR"
    settings = {"direction": direction, "source": open_checkpoint(source, what=what)}
    if direction == "import":
        settings.update(param_dtype=param_dtype, scan_layers=scan_layers)
    else:
        settings.update(dtype=dtype, max_shard_size=parse_size(max_shard_size))
    return run_stage(target, f"convert_{direction}", settings, lambda _: (
        _import(hf_dir, ckpt_dir, param_dtype, scan_layers) if direction == "import"
        else _export(ckpt_dir, hf_dir, dtype, max_shard_size)))


def _import(hf_dir: str, ckpt_dir: str, param_dtype: str, scan_layers: bool) -> dict:
    vocab = vocabulary_lib.load_vocabulary(hf_dir)  # a bad tokenizer fails first
    cfg, params = load_hf(hf_dir, param_dtype=param_dtype, scan_layers=scan_layers)
    if vocab is None:
        print(f"note: {hf_dir} holds no tokenizer ({vocabulary_lib.TOKENIZER_JSON} or "
              f"{vocabulary_lib.TOKENIZER_MODEL}); {ckpt_dir} records no vocabulary, so "
              f"jobs that start from it need VOCABULARY set")
    else:  # more ids than embedding rows: refused
        vocabulary_lib.resolve_vocabulary(None, vocab, cfg.vocab_size, hf_dir)
    save_params(ckpt_dir, cfg, params, vocabulary=vocab)
    print(f"imported {hf_dir} → {ckpt_dir}: {cfg.num_params() / 1e6:.1f}M parameters, "
          f"{cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads"
          + (f", vocabulary {vocab.kind} ({vocab.vocab_size} ids)" if vocab else ""))
    return {"direction": "import", "num_params": cfg.num_params(),
            "vocabulary": vocab.kind if vocab else None}


def _export(ckpt_dir: str, hf_dir: str, dtype: str, max_shard_size: int | str) -> dict:
    cfg, params = load_params(ckpt_dir)
    vocab = vocabulary_lib.load_vocabulary(ckpt_dir)
    if vocab is None:
        print(f"warning: {ckpt_dir} records no vocabulary: {hf_dir} gets no tokenizer "
              f"(AutoTokenizer.from_pretrained will not load it)")
    files = save_hf(cfg, params, hf_dir, dtype=dtype, max_shard_size=max_shard_size,
                    vocabulary=vocab)
    print(f"exported {ckpt_dir} → {hf_dir}: {len(files)} safetensors file(s), {dtype}"
          + (f", vocabulary {vocab.kind}" if vocab else ""))
    return {"direction": "export", "files": files,
            "vocabulary": vocab.kind if vocab else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xwin_jax.checkpoints.hf",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    imp = sub.add_parser("import", help="HF directory → params checkpoint (orbax)")
    imp.add_argument("--hf_dir", required=True)
    imp.add_argument("--out_dir", required=True)
    imp.add_argument("--param_dtype", default="float32")
    imp.add_argument("--no_scan_layers", action="store_true",
                     help="store layers unstacked (layers_0, layers_1, ...)")
    exp = sub.add_parser("export", help="params checkpoint → HF directory (safetensors)")
    exp.add_argument("--ckpt_dir", required=True)
    exp.add_argument("--hf_dir", required=True)
    exp.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    exp.add_argument("--max_shard_size", default="5GB")
    args = parser.parse_args(argv)
    try:
        if args.direction == "import":
            convert("import", args.hf_dir, args.out_dir, param_dtype=args.param_dtype,
                    scan_layers=not args.no_scan_layers)
        else:
            convert("export", args.hf_dir, args.ckpt_dir, dtype=args.dtype,
                    max_shard_size=args.max_shard_size)
    except UserError as err:  # as launch does: one line (and a hint), exit 2
        print(f"error: {err}" + (f"\nhint: {err.hint}" if err.hint else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
