"""seqio tasks over local files: host shards, seeded shuffling, mixtures, resumable batches."""

import json
import subprocess
import sys

import numpy as np
import pytest

from xwin_jax.data import synthetic, tasks
from xwin_jax.data.formats import DataFormatError
from xwin_jax.data.seqio_sft_data import SeqioSftData
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.errors import ConfigError

seqio = pytest.importorskip("seqio")
LENGTHS = {"ids": 257, "loss_mask": 257}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return synthetic.write_suite(str(tmp_path_factory.mktemp("suite")), seed=0, num_prompts=300)


def examples(task_name, shard=None, seed=3):
    task = seqio.get_mixture_or_task(task_name)
    dataset = task.get_dataset(LENGTHS, split="train", shuffle=True, seed=seed,
                               shard_info=shard, num_epochs=1)
    return [tuple(x["ids"]) for x in dataset.as_numpy_iterator()]


def test_host_shards_are_disjoint_and_complete(suite):
    tasks.register_sft_task("t_sft", {"train": [suite["sft_train"]]})
    whole = examples("t_sft")
    parts = [examples("t_sft", seqio.ShardInfo(i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(whole)
    assert not (set(parts[0]) & set(parts[1])) and not (set(parts[1]) & set(parts[2]))
    assert examples("t_sft", seed=3) == whole  # seeded shuffling is repeatable
    assert examples("t_sft", seed=4) != whole


def test_packed_batches_resume_at_the_same_step(suite):
    tasks.register_sft_task("t_sft256", {"train": [suite["sft_train"]]}, max_len=257)
    data = SeqioSftData("t_sft256", seq_len=256, batch_size=4, vocabulary="bytes", seed=1)
    stream = data.batches(0)
    expected = [next(stream) for _ in range(6)]
    resumed = SeqioSftData("t_sft256", seq_len=256, batch_size=4, seed=1).with_vocabulary(
        "bytes").batches(4)  # bound later, as a job binds its checkpoint's
    for want in expected[4:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    weights = expected[0]["loss_weights"]
    assert 0 < weights.sum() < weights.size and expected[0]["segment_ids"].max() >= 1


def test_data_shards_fill_their_own_rows_of_the_global_batch(suite):
    """num_shards=2 on one host lays out rows as two hosts with one shard each would: the
    first half of every batch from shard 0's examples, the second half from shard 1's."""
    tasks.register_sft_task("t_sft_shards", {"train": [suite["sft_train"]]}, max_len=257)
    data = SeqioSftData("t_sft_shards", seq_len=256, batch_size=4, vocabulary="bytes", seed=2,
                        num_shards=2)
    assert list(data.host_shards()) == [0, 1]
    batch = next(data.batches(0))
    shard_examples = [set(examples("t_sft_shards", seqio.ShardInfo(i, 2))) for i in range(2)]

    def first_example(row):
        segment = batch["segment_ids"][row] == 1
        inputs, targets = batch["input_tokens"][row][segment], batch["target_tokens"][row][segment]
        return tuple(np.concatenate([inputs, targets[-1:]]))

    for row, shard in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert first_example(row) in shard_examples[shard]
        assert first_example(row) not in shard_examples[1 - shard]
    with pytest.raises(ValueError, match="batch_size=3 does not split into 2 data shards"):
        SeqioSftData("t_sft_shards", seq_len=256, batch_size=3, num_shards=2).host_shards()


def test_mixture_rates(tmp_path):
    def write(name, answer, count):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": answer}) + "\n"
                                for i in range(count)))
        return str(path)

    tasks.register_sft_task("t_a", {"train": [write("a", "AAAA", 400)]})
    tasks.register_sft_task("t_b", {"train": [write("b", "BBBB", 400)]})
    tasks.register_mixture("t_mix", [("t_a", 3.0), ("t_b", 1.0)])
    mixture = seqio.get_mixture_or_task("t_mix")
    dataset = mixture.get_dataset(LENGTHS, split="train", shuffle=True, seed=0, num_epochs=None)
    from_a = 0
    for _, example in zip(range(400), dataset.as_numpy_iterator()):
        from_a += bytes(int(i) - 3 for i in example["ids"][-5:-1]) == b"AAAA"
    assert 0.68 < from_a / 400 < 0.82  # 3:1


def test_malformed_file_fails_at_registration_with_file_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:2: field 'output': missing"):
        tasks.register_sft_task("t_bad", {"train": [str(path)]})


def test_tfds_prepared_data_matches_the_files(suite, tmp_path):
    from xwin_jax.data import tfds_builder

    splits = {"train": [suite["sft_train"]], "validation": [suite["sft_valid"]]}
    builder = tfds_builder.prepare_sft("suite300", splits, str(tmp_path / "tfds"))
    config = builder.builder_config.name
    assert str(builder.info.version) == tfds_builder.VERSION and config.startswith("suite300_")
    assert (tmp_path / "tfds" / "xwin_sft" / config / "1.0.0").is_dir()
    tasks.register_tfds_sft_task("t_tfds", f"xwin_sft/{config}:1.0.0", str(tmp_path / "tfds"))
    tasks.register_sft_task("t_files", splits)
    assert sorted(examples("t_tfds")) == sorted(examples("t_files"))
    assert builder.info.splits["train"].num_examples == len(examples("t_files"))
    again = tfds_builder.prepare_sft("suite300", splits, str(tmp_path / "tfds"))  # reused
    assert again.builder_config.name == config
    # Other settings are other data: a new config, never the stale one.
    shorter = tfds_builder.prepare_sft("suite300", splits, str(tmp_path / "tfds"), max_len=200)
    assert shorter.builder_config.name != config


def test_pairs_and_prompts_tasks(suite):
    from xwin_jax.data import formats
    from xwin_jax.data.vocabulary import ByteVocabulary

    tasks.register_pairs_task("t_pairs", {"train": [suite["pairs_train"]]}, seq_len=400)
    dataset = seqio.get_mixture_or_task("t_pairs").get_dataset(
        None, split="train", shuffle=False, num_epochs=1)
    rows = list(dataset.as_numpy_iterator())
    pairs = formats.read_pairs(suite["pairs_train"]).records
    assert len(rows) == len(pairs)
    vocab = ByteVocabulary()
    for row, pair in zip(rows[:5], pairs[:5]):
        response = row["chosen_tokens"][row["chosen_response_mask"] > 0]
        assert vocab.decode(response[:-1]) == " " + pair.chosen and response[-1] == vocab.eos_id

    tasks.register_prompts_task("t_prompts", {"test": [suite["prompts_test"]]})
    dataset = seqio.get_mixture_or_task("t_prompts").get_dataset(
        None, split="test", shuffle=False, num_epochs=1)
    rows = list(dataset.as_numpy_iterator())
    prompts = formats.read_prompts(suite["prompts_test"]).records
    assert [int(r["index"][0]) for r in rows] == list(range(len(prompts)))
    assert vocab.decode(rows[0]["prompt_ids"]).endswith(f"USER: {prompts[0].text} ASSISTANT:")


def test_sft_trains_from_a_prepared_tfds_task_through_gin(tmp_path):
    from xwin_jax import launch

    summary = launch.run_gin_job(["experiments/tiny_sft_seqio.gin"], [
        f"WORKDIR = '{tmp_path / 'w'}'", f"DATA_DIR = '{tmp_path / 'data'}'",
        f"TFDS_DIR = '{tmp_path / 'tfds'}'", "TRAIN_STEPS = 4", "BATCH_SIZE = 8",
        "sft.train_sft.eval_data = None"])
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 8 * 512
    prepared = list((tmp_path / "tfds" / "xwin_sft").glob("synthetic_*/1.0.0"))
    assert len(prepared) == 1


def test_seqio_batches_refuse_examples_longer_than_a_row(suite):
    tasks.register_sft_task("t_long", {"train": [suite["sft_train"]]})  # no max_len
    with pytest.raises(ValueError, match=r"max_len <= seq_len \+ 1"):
        next(SeqioSftData("t_long", seq_len=64, batch_size=2, vocabulary="bytes").batches(0))


def test_seqio_data_binds_its_vocabulary_later_and_fingerprints_its_task(suite):
    tasks.register_sft_task("t_sft_lazy", {"train": [suite["sft_train"]]}, max_len=257)
    lazy = SeqioSftData("t_sft_lazy", seq_len=256, batch_size=4, seed=1, num_shards=2)
    with pytest.raises(ConfigError, match="the data has no vocabulary yet"):
        next(lazy.batches(0))
    assert "no vocabulary yet" in lazy.report()
    identity = {"type": "SeqioSftData", "task": "t_sft_lazy", "split": "train", "seed": 1,
                "num_shards": 2, "seq_len": 256, "batch_size": 4, "vocabulary": None}
    assert lazy.fingerprint() == identity
    bound = lazy.with_vocabulary(ByteVocabulary())
    eager = SeqioSftData("t_sft_lazy", seq_len=256, batch_size=4, seed=1, num_shards=2,
                         vocabulary="bytes")
    assert bound.fingerprint() == eager.fingerprint() == {
        **identity, "vocabulary": ByteVocabulary().fingerprint()}
    for got, want in zip([next(bound.batches(0)), next(bound.batches(1))],
                         [next(eager.batches(0)), next(eager.batches(1))]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert not lazy.has_vocabulary
    # None shards: one per host, so the identity records the host count it stands for.
    assert SeqioSftData("t_sft_lazy", seq_len=256, batch_size=4).fingerprint()["num_shards"] == 1
    assert SeqioSftData("t_sft_lazy", seq_len=256, batch_size=4, seed=2,
                        num_shards=2).fingerprint() == {**identity, "seed": 2}


def test_tasks_and_the_tfds_builder_import_each_other_in_no_cycle():
    code = ("import sys; import xwin_jax.data.tfds_builder; "
            "assert 'xwin_jax.data.tasks' not in sys.modules, 'tfds_builder imports tasks'; "
            "import xwin_jax.data.tasks; "
            "assert 'xwin_jax.data.seqio_sft_data' not in sys.modules, 'tasks imports it'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
