"""seqio registration: SFT, preference-pair and prompt tasks from local files, SFT tasks from
prepared TFDS data, mixtures with rates, and the packed, per-host, resumable SFT batches the
training loop reads.

    register_sft_task("my_sft", {"train": ["sharegpt.jsonl"], "validation": ["val.jsonl"]})
    register_mixture("my_mix", [("my_sft", 3.0), ("other_sft", 1.0)])
    data = SeqioSftData("my_mix", seq_len=2048, batch_size=64)   # .batches(start_step)

Examples carry two features, `ids` and `loss_mask` (the Xwin template's tokens and the mask
of answers + </s>), tokenized once per example in Python (template.py) so the mask is exact.
Each host reads its own shard (`seqio.ShardInfo(process_index, process_count)`); shuffling is
seeded; a resumed run replays the deterministic stream to its step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import numpy as np

from xwin_jax.data import converters, formats, packing, template
from xwin_jax.data.batching import GlobalBatches
from xwin_jax.data.vocabulary import get_vocabulary
from xwin_jax.errors import ConfigError

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


def tokenized_examples(paths: Sequence[str], vocabulary: str, max_len: int | None,
                       system: str | None, truncation: str, skip_invalid: bool):
    """(ids, loss_mask) for every usable conversation of the files, in file order."""
    vocab = get_vocabulary(vocabulary)
    for path in paths:
        for conversation in formats.read_sft(path, skip_invalid=skip_invalid):
            tokenized = template.tokenize_conversation(conversation, vocab, max_len, system,
                                                       truncation)
            if tokenized is not None:
                yield np.asarray(tokenized.ids, np.int32), np.asarray(tokenized.loss_mask,
                                                                      np.int32)


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


@dataclasses.dataclass
class SeqioSftData(GlobalBatches):
    """Packed SFT batches from a seqio task or mixture, read as `num_shards` data shards.

    Shard s packs its own examples into rows [s*R, (s+1)*R) of every global batch
    (R = batch_size / num_shards); each host reads the contiguous shards whose rows it feeds.
    With num_shards fixed, batch k is a pure function of (task, seed, num_shards, k) on any
    number of hosts: two hosts reading one shard each and one host reading both build the
    same global batches, so a run can resume on a different host count. None = one shard
    per host, which ties the data order to the host count.
    """
    task: str
    seq_len: int
    batch_size: int
    split: str = "train"
    seed: int = 0
    vocabulary: str = "bytes"  # the task's vocabulary: for pad_id and the model's vocab check
    num_shards: int | None = None

    def __post_init__(self):
        if self.num_shards is not None and self.num_shards < 1:
            raise ConfigError(f"SeqioSftData.num_shards={self.num_shards}: use a count >= 1, "
                              f"or None for one shard per host")
        self.vocab = get_vocabulary(self.vocabulary)
        self._streams = None
        self._next_step = None

    def report(self) -> str:
        return (f"seqio {self.task!r} split {self.split!r}, seed {self.seed}, "
                f"{self._shard_count()} data shards")

    def _shard_count(self) -> int:
        return self.num_shards or jax.process_count()

    def host_shards(self) -> range:
        """The data shards this host reads, in the order of its rows."""
        shards, hosts = self._shard_count(), jax.process_count()
        if shards % hosts:
            raise ConfigError(f"num_shards={shards} does not split over {hosts} hosts")
        if self.batch_size % shards:
            raise ConfigError(f"batch_size={self.batch_size} does not split into "
                              f"{shards} data shards")
        per_host = shards // hosts
        return range(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)

    def _examples(self, shard: int):
        import seqio
        task = seqio.get_mixture_or_task(self.task)
        length = {name: self.seq_len + 1 for name in FEATURES}
        # No silent trimming: a cut conversation would lose its </s> and skip the template's
        # truncation policy, which the task applies when registered with max_len.
        dataset = task.get_dataset(length, split=self.split, shuffle=True, seed=self.seed,
                                   shard_info=seqio.ShardInfo(shard, self._shard_count()),
                                   num_epochs=None, trim_output_features=False)
        for example in dataset.as_numpy_iterator():
            if len(example["ids"]) > self.seq_len + 1:
                raise ConfigError(
                    f"seqio task {self.task!r} has an example of {len(example['ids'])} tokens; "
                    f"register or prepare it with max_len <= seq_len + 1 = {self.seq_len + 1}")
            yield example["ids"], example["loss_mask"]

    def _rows(self, shard: int):
        """Packed rows of one data shard, forever, in a fixed order."""
        pending, length = [], 0
        for ids, mask in self._examples(shard):
            pending.append((ids, mask))
            length += len(ids) - 1
            if length >= 8 * self.seq_len:  # pack a few rows' worth at a time
                packed = packing.pack_examples(pending, self.seq_len, self.vocab.pad_id)
                for r in range(len(packed["input_tokens"]) - 1):  # the last may still fill up
                    yield {k: v[r] for k, v in packed.items()}
                last = len(packed["input_tokens"]) - 1
                pending = [e for e, s in zip(pending, _segment_rows(packed, len(pending)))
                           if s == last]
                length = sum(len(e[0]) - 1 for e in pending)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        shards = self.host_shards()
        per_shard = self.batch_size // self._shard_count()
        if self._streams is None or self._next_step != step:
            self._streams = [self._rows(shard) for shard in shards]
            for stream in self._streams:
                for _ in range(step * per_shard):  # replay to the resumed step
                    next(stream)
            self._next_step = step
        rows = [next(stream) for stream in self._streams for _ in range(per_shard)]
        self._next_step += 1
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        if jax.process_count() != 1:
            raise ConfigError("global_batch needs every host's shard; use local_batch")
        return self.local_batch(step)


def _segment_rows(packed: Mapping[str, np.ndarray], count: int) -> list[int]:
    """The row each of the `count` packed examples went to, in order."""
    rows = []
    for r, segments in enumerate(packed["segment_ids"]):
        rows += [r] * int(segments.max())
    assert len(rows) == count, (len(rows), count)
    return rows
