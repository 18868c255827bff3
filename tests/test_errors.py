"""Errors a user can act on: one line from launch (and a hint), exit 2, nothing lost."""

import json
import os
import subprocess
import sys

import jax
import pytest

from xwin_jax import launch
from xwin_jax.checkpoints.params import save_params
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.errors import UserError
from xwin_jax.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATION = {"conversations": [{"from": "human", "value": "Hi!"},
                                  {"from": "gpt", "value": "Hello."}]}


def write_sharegpt(path, records, raw_line: bytes | None = None):
    with open(path, "wb") as f:
        for record in records:
            f.write(json.dumps(record).encode() + b"\n")
        if raw_line is not None:
            f.write(raw_line + b"\n")
    return str(path)


def sft_bindings(workdir, train_file, *extra):
    return [f"WORKDIR = '{workdir}'", "TRAIN_STEPS = 1", "BATCH_SIZE = 2", "SEQ_LEN = 256",
            f"TRAIN_FILES = ['{train_file}']", *extra]


def launch_cli(gin_files, bindings, *flags, env=None):
    cmd = [sys.executable, "-m", "xwin_jax.launch", *(f"--gin_file={f}" for f in gin_files),
           *(f"--gin_bindings={b}" for b in bindings), *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def user_error_line(gin_files, bindings) -> str:
    """What launch prints for the UserError the job raises (the in-process path of main)."""
    with pytest.raises(UserError) as err:
        launch.run_gin_job(gin_files, bindings)
    return launch.describe_error(err.value)


def test_a_data_error_is_one_line_naming_file_line_and_field_and_exits_2(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt"}]}
    data = write_sharegpt(tmp_path / "train.jsonl", [CONVERSATION, bad])
    files = ["models/tiny.gin", "mesh/single.gin", "runs/sft.gin"]
    done = launch_cli(files, sft_bindings(tmp_path / "w", data))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {data}:2: field 'conversations[1].value': missing")
    assert "Traceback" not in done.stderr
    verbose = launch_cli(files, sft_bindings(tmp_path / "w", data), "--verbose")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith(f"error: {data}:2:")


def test_the_issue_s_non_finite_sft_exits_2_and_writes_no_state(tmp_path):
    """learning_rate=1e39, warmup 0, one step: used to exit 0 with every leaf of final/ NaN."""
    data = write_sharegpt(tmp_path / "train.jsonl", [CONVERSATION] * 4)
    done = launch_cli(["models/tiny.gin", "mesh/single.gin", "runs/sft.gin"], sft_bindings(
        tmp_path / "w", data, "LEARNING_RATE = 1e39"))
    assert done.returncode == 2, done.stderr[-3000:]
    error, hint = done.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: step 1: the update made the parameters or optimizer "
                            "state non-finite")
    assert hint.startswith("hint: lower the learning rate")
    assert not (tmp_path / "w" / "sft" / "final").exists()
    assert not os.listdir(tmp_path / "w" / "sft" / "checkpoints")


def test_invalid_utf8_through_launch_names_file_and_line(tmp_path):
    data = write_sharegpt(tmp_path / "train.jsonl", [CONVERSATION],
                          raw_line=b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}')
    line = user_error_line(["models/tiny.gin", "mesh/single.gin", "runs/sft.gin"],
                           sft_bindings(tmp_path / "w", data))
    assert line == (f"error: {data}:2: field '<line>': not valid UTF-8 (byte 51 of the line: "
                    f"b'\\xe9')")


def test_a_missing_checkpoint_is_named(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    line = user_error_line(["models/tiny.gin", "runs/generate.gin"], [
        f"CKPT_DIR = '{tmp_path / 'nowhere'}'", f"PROMPTS = '{prompts}'",
        f"OUTPUT_DIR = '{tmp_path / 'out'}'"])
    assert line.startswith(f"error: CKPT_DIR={tmp_path / 'nowhere'}: no such directory")


def test_bad_data_in_a_later_run_fails_in_one_line_and_what_was_done_stays(tmp_path):
    """A generate job rerun on a prompts file that gained a malformed line stops naming it;
    the outputs of the first run are untouched."""
    cfg = llama.preset("tiny")
    save_params(str(tmp_path / "ckpt"), cfg, llama.init_params(cfg, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": "Bye"}\n')
    bindings = [f"CKPT_DIR = '{tmp_path / 'ckpt'}'", f"PROMPTS = '{prompts}'",
                f"OUTPUT_DIR = '{tmp_path / 'out'}'", "generate.generate_job.max_new_tokens = 4",
                "generate.generate_job.batch_size = 2"]
    launch.run_gin_job(["models/tiny.gin", "runs/generate.gin"], bindings)
    outputs = (tmp_path / "out" / "outputs.jsonl").read_bytes()
    with open(prompts, "a") as f:
        f.write('{"prompt": "More?"}\n{"prompt": " "}\n')
    line = user_error_line(["models/tiny.gin", "runs/generate.gin"], bindings)
    assert line == f"error: {prompts}:4: field 'prompt': empty"
    assert (tmp_path / "out" / "outputs.jsonl").read_bytes() == outputs


def test_a_required_macro_that_was_not_set_is_named_with_the_flag_to_set_it(tmp_path):
    line = user_error_line(["runs/convert.gin"], ["DIRECTION = 'import'",
                                                   f"CKPT_DIR = '{tmp_path}'"])
    assert line == ("gin error: HF_DIR is required by runs/convert.gin and was not set\n"
                    "hint: add --gin.HF_DIR=<value> (strings in quotes: --gin.HF_DIR=\"'...'\")")


def test_an_unexpected_exception_is_not_dressed_as_a_user_error(monkeypatch):
    def broken(*args):
        raise KeyError("a bug")

    from absl import flags
    from absl.testing import flagsaver

    monkeypatch.setattr(launch, "run_gin_job", broken)
    with flagsaver.flagsaver():
        flags.FLAGS(["launch", "--gin_file=x.gin"])
        with pytest.raises(KeyError):
            launch.main(["launch"])


def test_a_vocabulary_that_is_not_there_is_named(tmp_path):
    data = write_sharegpt(tmp_path / "train.jsonl", [CONVERSATION] * 2)
    line = user_error_line(["models/tiny.gin", "mesh/single.gin", "runs/sft.gin"], sft_bindings(
        tmp_path / "w", data, f"VOCABULARY = '{tmp_path / 'tokenizer.model'}'"))
    assert line.startswith(f"error: VOCABULARY='{tmp_path / 'tokenizer.model'}': no such file")
    assert "hint: give 'bytes' or the path of a SentencePiece tokenizer.model" in line


def test_the_hf_command_line_reports_user_errors_as_launch_does(tmp_path, capsys):
    from xwin_jax.checkpoints import hf

    assert hf.main(["import", "--hf_dir", str(tmp_path / "nowhere"),
                    "--out_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: HF_DIR={tmp_path / 'nowhere'}: no such directory")
