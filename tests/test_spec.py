"""Model specs and opened checkpoints: the architecture comes from the checkpoint, overrides
that contradict it are refused, kinds convert (an LM trunk starts a reward model)."""

import jax
import numpy as np
import pytest

from xwin_jax.checkpoints.params import save_params
from xwin_jax.data.vocabulary import ByteVocabulary
from xwin_jax.errors import ConfigError
from xwin_jax.models import heads, llama
from xwin_jax.models.config import preset
from xwin_jax.models.spec import LM, SCORE, open_checkpoint, spec
from xwin_jax.partitioning import Partitioner

SMALL = preset("tiny", hidden_size=32, intermediate_size=64, num_layers=2, rope_theta=5e5)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("lm"))
    save_params(directory, SMALL, llama.init_params(SMALL, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    return directory


def test_the_architecture_comes_from_the_checkpoint_runtime_fields_from_the_gin_model(lm_dir):
    ckpt = open_checkpoint(lm_dir, preset("llama2_7b", remat_policy="full"))
    assert (ckpt.config.hidden_size, ckpt.config.num_layers, ckpt.config.rope_theta) == (
        32, 2, 5e5)
    assert ckpt.config.remat_policy == "full" and ckpt.config.dtype == "bfloat16"
    assert ckpt.kind == LM and ckpt.vocabulary == ByteVocabulary()


def test_an_override_that_contradicts_the_checkpoint_names_the_field(lm_dir):
    with pytest.raises(ConfigError) as err:
        open_checkpoint(lm_dir, preset("tiny", num_layers=4, rope_theta=1e4),
                        what="POLICY_DIR")
    message = str(err.value)
    assert "num_layers=4 (the checkpoint has 2)" in message
    assert "rope_theta=10000.0 (the checkpoint has 500000.0)" in message
    assert message.startswith("POLICY_DIR=")
    # An override equal to the checkpoint's value, or of a runtime field, is fine.
    assert open_checkpoint(lm_dir, preset("tiny", num_layers=2, scan_layers=False)
                           ).config.scan_layers is False


def test_a_score_model_starts_from_an_lm_trunk_with_a_fresh_head(lm_dir):
    ckpt = open_checkpoint(lm_dir, SMALL)
    partitioner = Partitioner({"data": 1, "fsdp": 1, "tensor": 1})
    score = ckpt.load(SCORE, spec(SCORE).shardings(ckpt.config, partitioner), seed=3)
    lm = ckpt.load(LM, spec(LM).shardings(ckpt.config, partitioner))
    np.testing.assert_array_equal(score[heads.TRUNK]["embed_tokens"]["embedding"],
                                  lm["embed_tokens"]["embedding"])
    assert "lm_head" not in score[heads.TRUNK]
    head = np.asarray(score[heads.HEAD]["kernel"])
    assert head.shape == (32, 1) and 0.05 < head.std() < 0.35  # std 1/sqrt(33) = 0.17


def test_a_reward_model_cannot_start_a_policy(tmp_path):
    save_params(str(tmp_path), SMALL, heads.init_reward_params(SMALL, jax.random.key(0)),
                head="score", vocabulary=ByteVocabulary())
    ckpt = open_checkpoint(str(tmp_path), SMALL)
    with pytest.raises(ConfigError, match="holds a 'score' model; a 'lm' model cannot"):
        ckpt.load_host(LM)


def test_a_checkpoint_fingerprint_follows_its_contents_not_its_path(lm_dir, tmp_path):
    before = open_checkpoint(lm_dir, SMALL).fingerprint()
    assert open_checkpoint(lm_dir, SMALL.replace(remat_policy="full")).fingerprint() == before
    save_params(str(tmp_path), SMALL, llama.init_params(SMALL, jax.random.key(1)),
                vocabulary=ByteVocabulary())
    other = open_checkpoint(str(tmp_path), SMALL).fingerprint()
    assert other["architecture"] == before["architecture"]
    assert other["params"] != before["params"]
