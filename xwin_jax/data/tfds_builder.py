"""A TFDS builder that prepares conversation files (or the synthetic suite) once into a
versioned, sharded, pre-tokenized dataset, so large runs read files instead of re-parsing JSON
on every host.

    builder = prepare_sft("my_data", {"train": ["a.jsonl"], "validation": ["v.jsonl"]},
                          data_dir="/data/tfds", vocabulary="/models/tokenizer.model")
    tasks.register_tfds_sft_task("my_sft", prepare_sft_name(...), "/data/tfds")

Each example holds `ids` and `loss_mask` from the Xwin template (template.py). The config name
identifies what was prepared; preparing the same name again reuses the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

from xwin_jax import hosts
from xwin_jax.data.sft_data import tokenized_examples

VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class XwinSftConfig(tfds.core.BuilderConfig):
    split_to_paths: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    vocabulary: str = "bytes"
    max_len: int | None = None
    system: str | None = None
    truncation: str = "drop_turns"


class XwinSft(tfds.core.GeneratorBasedBuilder):
    """Tokenized Xwin-template conversations with answer masks."""
    RELEASE_NOTES = {VERSION: "ids and loss_mask of the Xwin (Vicuna-style) template."}
    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIG_CLASS = XwinSftConfig

    def _info(self) -> tfds.core.DatasetInfo:
        import numpy as np
        sequence = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"ids": sequence, "loss_mask": sequence}),
            description=f"Conversations tokenized with vocabulary "
                        f"{self.builder_config.vocabulary}")

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(list(paths))
                for split, paths in self.builder_config.split_to_paths.items()}

    def _generate_examples(self, paths):
        config = self.builder_config
        for index, (ids, mask) in enumerate(tokenized_examples(
                paths, config.vocabulary, config.max_len, config.system, config.truncation,
                skip_invalid=False)):
            yield index, {"ids": ids, "loss_mask": mask}


def prepare_sft(name: str, split_to_paths: Mapping[str, Sequence[str]], data_dir: str, *,
                vocabulary: str = "bytes", max_len: int | None = None,
                system: str | None = None, truncation: str = "drop_turns") -> XwinSft:
    """Builds (or reuses) tfds `xwin_sft/<name>_<hash>:1.0.0` under data_dir; the hash covers
    the files and every tokenization setting, so changing any of them prepares anew instead
    of reading stale data. `builder.builder_config.name` is the full config name."""
    identity = json.dumps([{k: list(v) for k, v in sorted(split_to_paths.items())}, vocabulary,
                           max_len, system, truncation], sort_keys=True)
    name = f"{name}_{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
    config = XwinSftConfig(name=name, version=VERSION,
                           split_to_paths={k: list(v) for k, v in split_to_paths.items()},
                           vocabulary=vocabulary, max_len=max_len, system=system,
                           truncation=truncation)

    def build_and_prepare() -> XwinSft:
        # Constructed after the files exist, so a builder on a host that only reuses them
        # still reads their dataset_info (splits, example counts).
        builder = XwinSft(config=config, data_dir=data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False))
        return builder

    return hosts.leader_first(f"prepare tfds {data_dir}/{name}", build_and_prepare)


def prepare_sft_name(name: str, split_to_paths: Mapping[str, Sequence[str]], data_dir: str,
                     **kwargs) -> str:
    """prepare_sft, returning the TFDS name to read it by (what gin binds a task to)."""
    builder = prepare_sft(name, split_to_paths, data_dir, **kwargs)
    return f"xwin_sft/{builder.builder_config.name}:{VERSION}"
