"""launch.py: gin parsing, the --gin.NAME shorthand, error messages, and a real job."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import hf_logits, make_hf_model
from xwin_jax import launch
from xwin_jax.checkpoints import hf, params as params_ckpt
from xwin_jax.models.llama import Llama, init_params, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rewrite_gin_args():
    argv = ["prog", "--gin.HF_DIR='/a b'", "--gin_file=x.gin", "--gin.hf.convert.dtype='float32'"]
    assert launch.rewrite_gin_args(argv) == [
        "prog", "--gin_bindings=HF_DIR = '/a b'", "--gin_file=x.gin",
        "--gin_bindings=hf.convert.dtype = 'float32'"]


def test_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("from __gin__ import dynamic_registration\nthis is not gin\n")
    with pytest.raises(launch.GinConfigError, match=str(bad)):
        launch.run_gin_job([str(bad)], [])


def test_unknown_configurable_names_the_file(tmp_path):
    bad = tmp_path / "unknown.gin"
    bad.write_text("from __gin__ import dynamic_registration\n"
                   "from xwin_jax.checkpoints import hf\nhf.no_such_function.x = 1\n")
    with pytest.raises(launch.GinConfigError, match=rf"{bad}.*no_such_function"):
        launch.run_gin_job([str(bad)], [])


def test_missing_file_lists_search_paths():
    with pytest.raises(launch.GinConfigError, match=r"'nope\.gin' not found"):
        launch.run_gin_job(["nope.gin"], [])


def test_bad_binding_is_named():
    with pytest.raises(launch.GinConfigError, match=r"--gin_bindings 'DIRECTION = \('"):
        launch.run_gin_job(["runs/convert.gin"], ["DIRECTION = ("])


def test_convert_round_trip_through_launch(tmp_path):
    """import then export through `python -m xwin_jax.launch`, as a user runs it."""
    model = make_hf_model()
    hf_dir, ckpt_dir, out_dir = (str(tmp_path / n) for n in ("hf", "ckpt", "hf_out"))
    model.save_pretrained(hf_dir)

    def launch_cli(direction, hf_path):
        cmd = [sys.executable, "-m", "xwin_jax.launch", "--gin_file=gin/runs/convert.gin",
               f"--gin.DIRECTION='{direction}'", f"--gin.HF_DIR='{hf_path}'",
               f"--gin.CKPT_DIR='{ckpt_dir}'", "--gin.hf.convert.dtype='float32'"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    launch_cli("import", hf_dir)
    assert "DIRECTION = 'import'" in open(os.path.join(ckpt_dir, "config.gin")).read()
    operative = open(os.path.join(ckpt_dir, "operative_config.gin")).read()
    assert "hf.convert.direction = %DIRECTION" in operative

    cfg, params = params_ckpt.load_params(ckpt_dir)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"  # the defaults
    tokens = np.arange(24).reshape(2, 12) % cfg.vocab_size
    ours = np.asarray(Llama(cfg.replace(dtype="float32")).apply({"params": params},
                                                                jax.numpy.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=1e-4, rtol=0)

    launch_cli("export", out_dir)
    reread_cfg, reread = hf.load_hf(out_dir)
    assert reread_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, reread, params)


def test_required_macro_missing_is_reported(tmp_path):
    cmd = [sys.executable, "-m", "xwin_jax.launch", "--gin_file=gin/runs/convert.gin",
           "--gin.DIRECTION='import'", f"--gin.CKPT_DIR='{tmp_path}'"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "HF_DIR" in done.stderr


def test_params_checkpoint_layout_conversion(tmp_path):
    cfg = preset("tiny", scan_layers=True)
    params = init_params(cfg, jax.random.key(1))
    params_ckpt.save_params(str(tmp_path), cfg, params)
    cfg2, unscanned = params_ckpt.load_params(str(tmp_path), scan_layers=False)
    assert not cfg2.scan_layers and "layers_0" in unscanned
    np.testing.assert_array_equal(unscanned["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  params["layers"]["mlp"]["up_proj"]["kernel"][1])
    json.load(open(tmp_path / "model_config.json"))


def test_a_conversion_rerun_is_skipped_and_a_changed_one_refused(tmp_path, capsys):
    from xwin_jax.train.stage import StageChanged

    hf_dir, ckpt_dir = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    make_hf_model().save_pretrained(hf_dir)
    hf.convert("import", hf_dir, ckpt_dir)
    hf.convert("import", hf_dir, ckpt_dir)
    assert "[convert_import] already finished with these settings" in capsys.readouterr().out
    with pytest.raises(StageChanged, match=r"param_dtype: \"float32\" → \"bfloat16\""):
        hf.convert("import", hf_dir, ckpt_dir, param_dtype="bfloat16")
    make_hf_model(seed=1).save_pretrained(hf_dir)  # other weights in the same place
    with pytest.raises(StageChanged, match=r"source\.params"):
        hf.convert("import", hf_dir, ckpt_dir)
