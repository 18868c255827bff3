"""The stage runner and fingerprints: skip, resume, refuse, overwrite; identity by content."""

import dataclasses
import json
import os
import shutil

import pytest

from xwin_jax import fingerprint, jobs
from xwin_jax.models.config import preset
from xwin_jax.train import state as train_state
from xwin_jax.train.stage import FINGERPRINT_FILE, SUMMARY_FILE, StageChanged, run_stage


class Body:
    """A stage body that records its calls and can fail once."""

    def __init__(self, fail=False):
        self.calls, self.fail = 0, fail

    def __call__(self, stage_dir):
        self.calls += 1
        with open(os.path.join(stage_dir, "work.txt"), "a") as f:
            f.write("x")
        if self.fail:
            self.fail = False
            raise RuntimeError("killed")
        return {"value": 7}


def settings(lr=1e-3, data=None):
    return {"optimizer": train_state.OptimizerConfig(learning_rate=lr), "model": preset("tiny"),
            "data": data}


def test_same_settings_skip_changed_settings_are_refused_with_the_difference(tmp_path):
    body = Body()
    first = run_stage(str(tmp_path / "s"), "sft", settings(), body)
    assert first["value"] == 7 and first["stage"] == "sft" and body.calls == 1
    recorded = json.load(open(tmp_path / "s" / FINGERPRINT_FILE))
    assert recorded["job"] == "sft"
    assert recorded["fingerprint"]["optimizer"]["learning_rate"] == 1e-3

    again = run_stage(str(tmp_path / "s"), "sft", settings(), body)
    assert body.calls == 1 and again == first

    with pytest.raises(StageChanged) as err:
        run_stage(str(tmp_path / "s"), "sft", settings(lr=1e-2), body)
    assert "optimizer.learning_rate: 0.001 → 0.01" in str(err.value)
    assert "overwrite=True" in err.value.hint and body.calls == 1
    assert json.load(open(tmp_path / "s" / SUMMARY_FILE))["value"] == 7  # nothing lost


def test_overwrite_discards_the_stage_and_runs_it_again(tmp_path):
    body = Body()
    run_stage(str(tmp_path / "s"), "sft", settings(), body)
    result = jobs.run(lambda: run_stage(str(tmp_path / "s"), "sft", settings(lr=0.5), body),
                      output_dir=None, overwrite=True)
    assert body.calls == 2 and result["value"] == 7
    assert open(tmp_path / "s" / "work.txt").read() == "x"  # the old work is gone
    assert json.load(open(tmp_path / "s" / FINGERPRINT_FILE))["fingerprint"]["optimizer"][
        "learning_rate"] == 0.5
    assert not jobs.context().overwrite  # only for that job


def test_overwrite_keeps_paid_judge_verdicts(tmp_path):
    """judge_cache.jsonl is keyed by what was judged and who judged it: an overwrite (e.g.
    evaluate with an instruction-difficulty file now) reuses it instead of paying again."""
    body = Body()
    run_stage(str(tmp_path / "s"), "evaluate", settings(), body)
    (tmp_path / "s" / "judge_cache.jsonl").write_text('{"key": "k", "verdict": {}}\n')
    jobs.run(lambda: run_stage(str(tmp_path / "s"), "evaluate", settings(lr=0.5), body),
             output_dir=None, overwrite=True)
    assert open(tmp_path / "s" / "work.txt").read() == "x"
    assert (tmp_path / "s" / "judge_cache.jsonl").read_text() == '{"key": "k", "verdict": {}}\n'


def test_an_unfinished_stage_resumes_with_the_same_settings(tmp_path):
    body = Body(fail=True)
    with pytest.raises(RuntimeError):
        run_stage(str(tmp_path / "s"), "sft", settings(), body)
    assert not (tmp_path / "s" / SUMMARY_FILE).exists()
    run_stage(str(tmp_path / "s"), "sft", settings(), body)
    assert body.calls == 2 and open(tmp_path / "s" / "work.txt").read() == "xx"  # kept


def test_a_directory_of_another_job_or_an_older_version_is_not_reused(tmp_path):
    run_stage(str(tmp_path / "out"), "generate", settings(), Body())
    with pytest.raises(StageChanged, match="'generate' job; the 'evaluate' job needs"):
        run_stage(str(tmp_path / "out"), "evaluate", settings(), Body())
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    with pytest.raises(StageChanged, match="no fingerprint.json: written by an older"):
        run_stage(str(old), "sft", settings(), Body())


def test_configs_go_to_each_stage_directory(tmp_path):
    written = []

    def writer(directory, finished):
        written.append((os.path.basename(directory), finished))

    jobs.run(lambda: [run_stage(str(tmp_path / name), name, settings(), Body())
                      for name in ("sft", "reward")], output_dir=None, config_writer=writer)
    assert written == [("sft", False), ("sft", True), ("reward", False), ("reward", True)]


def test_files_are_identified_by_content_not_path(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"prompt": "hi"}\n')
    shutil.copy(a, tmp_path / "b.jsonl")
    assert fingerprint.file_identity(str(a)) == fingerprint.file_identity(
        str(tmp_path / "b.jsonl"))
    a.write_text('{"prompt": "ho"}\n')
    assert fingerprint.file_identity(str(a)) != fingerprint.file_identity(
        str(tmp_path / "b.jsonl"))


def test_runtime_fields_are_not_part_of_a_model_fingerprint():
    tiny = fingerprint.describe(preset("tiny"))
    assert fingerprint.describe(preset("tiny", remat_policy="full", scan_layers=False)) == tiny
    assert fingerprint.describe(preset("tiny", dtype="bfloat16")) != tiny
    assert fingerprint.describe(preset("tiny", num_layers=3))["num_layers"] == 3


def test_an_undescribed_setting_is_an_error_not_a_silent_skip():
    with pytest.raises(TypeError, match="cannot fingerprint a object"):
        fingerprint.describe({"x": object()})

    @dataclasses.dataclass
    class Judge:
        model: str = "gpt-4"
        api_key: str = "sk-secret"
        FINGERPRINT_EXCLUDE = ("api_key",)

    assert fingerprint.describe(Judge()) == {"type": "Judge", "model": "gpt-4"}


def test_changes_lists_each_difference_once():
    before = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    after = {"a": {"b": 2, "c": [1, 3]}, "e": True}
    assert fingerprint.changes(before, after) == [
        "a.b: 1 → 2", "a.c.1: 2 → 3", 'd: "x" → "<unset>"', 'e: "<unset>" → true']
