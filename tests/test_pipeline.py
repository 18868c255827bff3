"""The quickstart pipeline through launch, as `make quickstart` runs it; model gin files."""

import glob
import json
import os

import pytest

from xwin_jax import launch
from xwin_jax.models.config import LlamaConfig, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runs_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "qs")
    bindings = [f"WORKDIR = '{workdir}'", "pipeline.run.num_tokens = 3"]
    results = launch.run_gin_job(["experiments/quickstart.gin"], bindings)
    summary = json.load(open(os.path.join(workdir, "model", "summary.json")))
    assert summary == results["model"]
    assert summary["round_trip_max_abs_logit_diff"] == 0.0
    assert len(summary["greedy_token_ids"]) == 3
    assert all(0 <= t < preset("tiny").vocab_size for t in summary["greedy_token_ids"])
    assert os.path.exists(os.path.join(workdir, "model", "hf", "model.safetensors"))
    assert os.path.exists(os.path.join(workdir, "config.gin"))
    capsys.readouterr()
    again = launch.run_gin_job(["experiments/quickstart.gin"], bindings)
    assert "already done" in capsys.readouterr().out
    assert again == results


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin"))))
def test_model_gin_files_build_their_preset(path):
    import gin
    launch.parse_gin([path], ["config.preset.remat_policy = 'full'"], [REPO])
    cfg = gin.query_parameter("%MODEL").scoped_configurable_fn()
    name = os.path.basename(path)[:-len(".gin")]
    assert isinstance(cfg, LlamaConfig)
    assert cfg == preset(name, remat_policy="full")
