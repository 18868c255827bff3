"""seqio registration: SFT, preference-pair and prompt tasks from local files, SFT tasks from
prepared TFDS data, and mixtures with rates. The packed, per-host, resumable SFT batches the
training loop reads from them are seqio_sft_data.SeqioSftData.

    register_sft_task("my_sft", {"train": ["sharegpt.jsonl"], "validation": ["val.jsonl"]})
    register_mixture("my_mix", [("my_sft", 3.0), ("other_sft", 1.0)])
    data = seqio_sft_data.SeqioSftData("my_mix", seq_len=2048, batch_size=64)

Examples carry two features, `ids` and `loss_mask` (the Xwin template's tokens and the mask
of answers + </s>), tokenized once per example in Python (template.py, via
sft_data.tokenized_examples) so the mask is exact. Each host reads its own shard
(`seqio.ShardInfo(process_index, process_count)`); shuffling is seeded; a resumed run replays
the deterministic stream to its step.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import numpy as np

from xwin_jax.data import converters, formats, template
from xwin_jax.data.sft_data import tokenized_examples
from xwin_jax.data.vocabulary import get_vocabulary

FEATURES = ("ids", "loss_mask")


def _tf():
    import tensorflow as tf  # deferred: TensorFlow is only needed by the seqio data path
    tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
    return tf


PAIR_FEATURES = ("chosen_tokens", "chosen_response_mask", "rejected_tokens",
                 "rejected_response_mask")
PROMPT_FEATURES = ("prompt_ids", "index")


def output_features(names: Sequence[str] = FEATURES):
    import seqio
    tf = _tf()
    # The ids are already tokenized; seqio only passes them through (no EOS appended).
    return {name: seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                                dtype=tf.int32) for name in names}


def pair_examples(paths: Sequence[str], vocabulary: str, seq_len: int, system: str | None,
                  skip_invalid: bool):
    """Unpadded chosen/rejected token rows with their response masks, per pair."""
    vocab = get_vocabulary(vocabulary)
    for path in paths:
        for pair in formats.read_pairs(path, skip_invalid=skip_invalid):
            row = converters.pairs_batch([pair], vocab, seq_len, system)
            out = {}
            for side in ("chosen", "rejected"):
                length = int(row[f"{side}_length"][0])
                out[f"{side}_tokens"] = row[f"{side}_tokens"][0, :length]
                out[f"{side}_response_mask"] = row[f"{side}_response_mask"][0, :length].astype(
                    np.int32)
            yield out


def prompt_examples(paths: Sequence[str], vocabulary: str, system: str | None,
                    skip_invalid: bool):
    """Prompt ids ending in "ASSISTANT:", with the running index of the prompt."""
    vocab = get_vocabulary(vocabulary)
    index = 0
    for path in paths:
        for prompt in formats.read_prompts(path, skip_invalid=skip_invalid):
            yield {"prompt_ids": np.asarray(template.tokenize_prompt(
                prompt.conversation, vocab, system), np.int32),
                "index": np.asarray([index], np.int32)}
            index += 1


def _sft_dicts(paths, vocabulary, max_len, system, truncation, skip_invalid):
    for ids, mask in tokenized_examples(paths, vocabulary, max_len, system, truncation,
                                        skip_invalid):
        yield {"ids": ids, "loss_mask": mask}


def _files_dataset_fn(split_to_paths, make_examples, names, split, shuffle_files, seed=None):
    tf = _tf()
    paths = split_to_paths[split]
    if shuffle_files and seed is not None:
        paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    signature = {name: tf.TensorSpec([None], tf.int32) for name in names}
    return tf.data.Dataset.from_generator(lambda: make_examples(paths),
                                          output_signature=signature)


def _register_files_task(name, split_to_paths, read, make_examples, names, overwrite):
    """A task over local files; they are read once here so a malformed record fails now,
    naming file:line, not deep inside tf.data."""
    import seqio
    for paths in split_to_paths.values():
        for path in paths:
            read(path)
    source = seqio.FunctionDataSource(
        functools.partial(_files_dataset_fn, {k: list(v) for k, v in split_to_paths.items()},
                          make_examples, names),
        splits=list(split_to_paths))
    return _add_task(name, source, overwrite, names)


def register_sft_task(name: str, split_to_paths: Mapping[str, Sequence[str]], *,
                      vocabulary: str = "bytes", max_len: int | None = None,
                      system: str | None = None, truncation: str = "drop_turns",
                      skip_invalid: bool = False, overwrite: bool = True) -> str:
    """An SFT task (features ids, loss_mask) over ShareGPT / chat / Alpaca files."""
    return _register_files_task(
        name, split_to_paths, functools.partial(formats.read_sft, skip_invalid=skip_invalid),
        functools.partial(_sft_dicts, vocabulary=vocabulary, max_len=max_len, system=system,
                          truncation=truncation, skip_invalid=skip_invalid),
        FEATURES, overwrite)


def register_pairs_task(name: str, split_to_paths: Mapping[str, Sequence[str]], *,
                        seq_len: int, vocabulary: str = "bytes", system: str | None = None,
                        skip_invalid: bool = False, overwrite: bool = True) -> str:
    """A preference-pairs task (chosen/rejected tokens and response masks, each row at most
    seq_len long) over pairs JSONL files."""
    return _register_files_task(
        name, split_to_paths, functools.partial(formats.read_pairs, skip_invalid=skip_invalid),
        functools.partial(pair_examples, vocabulary=vocabulary, seq_len=seq_len, system=system,
                          skip_invalid=skip_invalid),
        PAIR_FEATURES, overwrite)


def register_prompts_task(name: str, split_to_paths: Mapping[str, Sequence[str]], *,
                          vocabulary: str = "bytes", system: str | None = None,
                          skip_invalid: bool = False, overwrite: bool = True) -> str:
    """A generation-prompts task (prompt_ids ending with "ASSISTANT:", index) over prompt
    lists (JSONL with `prompt`, or AlpacaEval's JSON with `instruction`)."""
    return _register_files_task(
        name, split_to_paths, functools.partial(formats.read_prompts, skip_invalid=skip_invalid),
        functools.partial(prompt_examples, vocabulary=vocabulary, system=system,
                          skip_invalid=skip_invalid),
        PROMPT_FEATURES, overwrite)


def register_tfds_sft_task(name: str, tfds_name: str, data_dir: str,
                           overwrite: bool = True) -> str:
    """An SFT task over a prepared TFDS dataset (tfds_builder.py): pre-tokenized, sharded files,
    so hosts read their own files instead of re-parsing JSON."""
    import seqio
    # Deferred (TensorFlow Datasets is heavy), not circular: tfds_builder does not import this.
    from xwin_jax.data import tfds_builder  # noqa: F401  (registers the builder with TFDS)
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir)
    return _add_task(name, source, overwrite)


def _add_task(name, source, overwrite, names=FEATURES):
    import seqio
    if overwrite and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source, output_features=output_features(names),
                           preprocessors=[], shuffle_buffer_size=10_000)
    return name


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]],
                     overwrite: bool = True) -> str:
    import seqio
    if overwrite and name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, list(tasks_and_rates))
    return name
