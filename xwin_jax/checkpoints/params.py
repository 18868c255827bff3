"""A params-only checkpoint: `DIR/model_config.json` plus orbax `DIR/params/`.

The hand-off format between stages inside the project (HF import writes it, HF export and
every stage that starts from a model read it). `DIR/params_digest.json` records a digest of
the parameter values (checkpoints/digest.py), so a cache built from a checkpoint (DPO's
reference log-probs) can tell a retrained checkpoint in the same directory from the one it
was built from. A checkpoint carries its tokenizer: `save_params(..., vocabulary=v)` writes the
tokenizer files and `DIR/vocabulary.json` (data/vocabulary.py), which
`load_checkpoint_vocabulary(DIR)` reads back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from xwin_jax.checkpoints import digest
from xwin_jax.checkpoints.safetensors_io import CheckpointError
from xwin_jax.data import vocabulary as vocabulary_lib
from xwin_jax.models import llama
from xwin_jax.models.config import LlamaConfig

MODEL_CONFIG_FILE = "model_config.json"
HEAD_FILE = "head.json"
DIGEST_FILE = "params_digest.json"
PARAMS_DIR = "params"


def save_params(directory: str, cfg: LlamaConfig, params: Any, head: str = "lm", *,
                vocabulary: Any = None) -> None:
    """Writes the config and params (head 'lm': a Llama; 'score': a reward/value model
    {"model", "score"}); the params directory is replaced if it exists. `vocabulary` (a
    data.vocabulary Vocabulary) is written beside them: its tokenizer files and
    vocabulary.json. Tokenizer files an earlier checkpoint left in the directory are removed
    either way: a checkpoint records only the vocabulary its writer gave."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() == 0:  # an overwrite killed midway must not look complete
        # (A vocabulary keeps its files' contents in memory: one loaded from this very
        # directory survives the removal.)
        for stale in (MODEL_CONFIG_FILE, DIGEST_FILE, vocabulary_lib.VOCABULARY_FILE,
                      *vocabulary_lib.TOKENIZER_FILES):
            if os.path.exists(os.path.join(directory, stale)):
                os.remove(os.path.join(directory, stale))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
    digest_params = digest.params_digest(params)  # every host takes part (sharded leaves)
    # The config goes last (one writer): its presence marks a complete checkpoint.
    if jax.process_index() == 0:
        if vocabulary is not None:
            vocabulary_lib.get_vocabulary(vocabulary).save(directory)
        with open(os.path.join(directory, HEAD_FILE), "w") as f:
            json.dump({"head": head}, f)
        with open(os.path.join(directory, DIGEST_FILE), "w") as f:
            json.dump({"params_digest": digest_params, "algorithm": digest.ALGORITHM}, f)
        with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)


def load_checkpoint_vocabulary(directory: str):
    """The vocabulary a checkpoint records (None for one written before checkpoints carried
    their tokenizer)."""
    return vocabulary_lib.load_vocabulary(directory)


def checkpoint_digest(directory: str) -> str:
    """The digest of a checkpoint's parameter values (see checkpoints/digest.py)."""
    return digest.checkpoint_digest(directory, DIGEST_FILE, PARAMS_DIR)


def load_config(directory: str) -> LlamaConfig:
    path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing; {directory} is not a complete params "
                              f"checkpoint (written by save_params / `hf import`)")
    with open(path) as f:
        try:
            return LlamaConfig.from_dict(json.load(f))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{path}: {err}") from err


def load_head(directory: str) -> str:
    """'lm' or 'score' (checkpoints written before heads existed are LMs)."""
    path = os.path.join(directory, HEAD_FILE)
    if not os.path.exists(path):
        return "lm"
    with open(path) as f:
        return json.load(f)["head"]


def param_shapes(cfg: LlamaConfig, head: str) -> Any:
    if head == "score":
        from xwin_jax.models import heads
        return heads.reward_param_shapes(cfg)
    return llama.param_shapes(cfg)


def load_params(directory: str, *, scan_layers: bool | None = None, shardings: Any = None,
                to_host: bool = False) -> tuple[LlamaConfig, Any]:
    """Restores (config, params): onto `shardings` (a tree in the saved layer layout), or as
    host NumPy arrays with to_host, or by default onto the first local device — whatever
    topology wrote the checkpoint. `scan_layers` converts to the other layer layout."""
    directory = os.path.abspath(directory)
    cfg = load_config(directory)
    shapes = param_shapes(cfg, load_head(directory))
    path = os.path.join(directory, PARAMS_DIR)
    if to_host:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
        params = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(item=shapes, restore_args=restore_args))
    else:
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, shapes)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              shapes, shardings)
        params = ocp.StandardCheckpointer().restore(path, target)
    if scan_layers is not None and scan_layers != cfg.scan_layers:
        convert = ((lambda p: llama.stack_layers(p, cfg.num_layers)) if scan_layers
                   else llama.unstack_layers)
        params = (dict(params, model=convert(params["model"])) if "score" in params
                  else convert(params))
        cfg = cfg.replace(scan_layers=scan_layers)
    return cfg, params
