"""SFT loss, optimizer pieces and gradient accumulation against plain references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xwin_jax.data.toy import ReverseTask
from xwin_jax.models import llama
from xwin_jax.models.config import preset
from xwin_jax.train import sft
from xwin_jax.train import state as train_state
from xwin_jax.train.step import accumulate_gradients, make_train_step

CFG = preset("tiny")
PARAMS = llama.init_params(CFG, jax.random.key(0))
BATCH = {k: jnp.asarray(v) for k, v in ReverseTask(8, 32).global_batch(3).items()}


def numpy_masked_ce(logits, targets, weights):
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return ((log_z - target_logit) * weights).sum() / weights.sum(), log_z


def test_loss_matches_numpy_reference():
    logits = np.asarray(llama.Llama(CFG).apply({"params": PARAMS}, BATCH["input_tokens"],
                                               segment_ids=BATCH["segment_ids"]))
    expected, log_z = numpy_masked_ce(logits, np.asarray(BATCH["target_tokens"]),
                                      np.asarray(BATCH["loss_weights"]))
    out = sft.sft_loss_fn(CFG, z_loss=1e-4)(PARAMS, BATCH)
    weights = np.asarray(BATCH["loss_weights"])
    z_loss = 1e-4 * (log_z ** 2 * weights).sum()
    assert float(out.count) == weights.sum() > 0
    np.testing.assert_allclose(float(out.sums["nll"] / out.count), expected, rtol=1e-5)
    np.testing.assert_allclose(float(out.sums["z_loss"]), z_loss, rtol=1e-4)
    # The logged loss is what the gradient minimises: cross-entropy plus z-loss per token.
    means = out.means()
    np.testing.assert_allclose(float(means["loss"]), expected + z_loss / weights.sum(),
                               rtol=1e-5)


def test_chunked_loss_equals_whole_loss_and_gradients():
    whole = sft.sft_loss_fn(CFG)
    chunked = sft.sft_loss_fn(CFG, chunk_size=8)
    out_a, grads_a = accumulate_gradients(whole, PARAMS, BATCH, 1)
    out_b, grads_b = accumulate_gradients(chunked, PARAMS, BATCH, 1)
    np.testing.assert_allclose(float(out_a.objective), float(out_b.objective), rtol=1e-5)
    np.testing.assert_allclose(float(out_a.sums["accuracy"]), float(out_b.sums["accuracy"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 grads_a, grads_b)  # summed loss: gradients are O(10)
    with pytest.raises(ValueError, match="must divide"):
        sft.sft_loss_fn(CFG, chunk_size=7)(PARAMS, BATCH)


def test_gradient_accumulation_4x2_equals_batch_8():
    # Plain SGD with rate 1: the parameter change is the gradient itself (Adam's first step
    # is ~sign(g) and would hide a normalisation error).
    schedule = optax.constant_schedule(1.0)
    optimizer = optax.sgd(schedule)
    loss_fn = sft.sft_loss_fn(CFG)
    state = train_state.init_state(PARAMS, optimizer)
    big, big_metrics = jax.jit(make_train_step(loss_fn, optimizer, schedule, 1))(state, BATCH)
    state = train_state.init_state(PARAMS, optimizer)
    acc, acc_metrics = jax.jit(make_train_step(loss_fn, optimizer, schedule, 4))(state, BATCH)
    np.testing.assert_allclose(float(acc_metrics["loss"]), float(big_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(acc_metrics["grad_norm"]), float(big_metrics["grad_norm"]),
                               rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), acc.params, big.params)
    moved = max(float(jnp.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(big.params), jax.tree.leaves(PARAMS)))
    assert moved > 1e-3  # the step did something the comparison can see
    assert int(acc.step) == 1


def test_bf16_params_keep_their_dtypes_through_a_step():
    """Gradients are normalised in their parameter dtype, so bf16 params and AdamW's moments
    stay bf16 (a changed dtype would recompile step 2 and break checkpoint restore)."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    schedule = train_state.make_schedule(1e-3, 10)
    optimizer = train_state.make_optimizer(schedule)
    state = train_state.init_state(params, optimizer)
    dtypes = [x.dtype for x in jax.tree.leaves(state)]
    step = jax.jit(make_train_step(sft.sft_loss_fn(CFG), optimizer, schedule))
    new_state, metrics = step(state, BATCH)
    assert [x.dtype for x in jax.tree.leaves(new_state)] == dtypes
    assert jnp.bfloat16 in dtypes and np.isfinite(float(metrics["loss"]))


def test_schedule_shape():
    schedule = train_state.make_schedule(1.0, total_steps=110, warmup_steps=10, decay="cosine")
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)  # half way down the cosine
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)
    linear = train_state.make_schedule(1.0, 100, 0, "linear", final_learning_rate_ratio=0.1)
    assert float(linear(50)) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="decay"):
        train_state.make_schedule(1.0, 10, decay="step")


def test_weight_decay_skips_norms_also_when_stacked():
    scanned = llama.init_params(preset("tiny", scan_layers=True), jax.random.key(0))
    mask = train_state.decay_mask(scanned)
    assert mask["layers"]["input_norm"]["scale"] is False  # shape [layers, D]: 2-D but a norm
    assert mask["final_norm"]["scale"] is False
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] is True
    assert mask["embed_tokens"]["embedding"] is True
    # With zero gradients only decay moves params: norms must stay exactly where they were.
    optimizer = train_state.make_optimizer(1e-2, weight_decay=0.1, max_grad_norm=None)
    state = train_state.init_state(scanned, optimizer)
    zeros = jax.tree.map(jnp.zeros_like, scanned)
    moved = train_state.apply_gradients(state, zeros, optimizer).params
    np.testing.assert_array_equal(moved["layers"]["input_norm"]["scale"],
                                  scanned["layers"]["input_norm"]["scale"])
    np.testing.assert_allclose(moved["lm_head"]["kernel"],
                               scanned["lm_head"]["kernel"] * (1 - 1e-2 * 0.1), rtol=1e-6)


def test_gradient_clipping_happens_before_adam():
    # eps = 1 makes Adam's first update g / (|g| + 1): it depends on the clipped magnitude.
    grads = {"w": jnp.asarray([3.0, 4.0, 0.0])}  # global norm 5
    params = {"w": jnp.ones((3,))}
    for max_norm, scale in ((0.5, 0.1), (None, 1.0)):
        optimizer = train_state.make_optimizer(1.0, eps=1.0, max_grad_norm=max_norm)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        g = np.array([3.0, 4.0, 0.0]) * scale
        np.testing.assert_allclose(np.asarray(updates["w"]), -g / (np.abs(g) + 1.0), rtol=1e-5)


def test_job_starts_from_an_hf_checkpoint(hf_model_dir, tmp_path):
    """init_dir is one binding: the architecture and weights come from the HF directory."""
    from xwin_jax.checkpoints.hf import load_hf
    from xwin_jax.checkpoints.params import load_params

    path, _ = hf_model_dir(vocab_size=512)
    summary = sft.train_sft(str(tmp_path), preset("tiny"), 2, ReverseTask(8, 16),
                            optimizer=train_state.OptimizerConfig(learning_rate=0.0),
                            init_dir=path, vocabulary="bytes", async_checkpoints=False)
    cfg, trained = load_params(summary["export_dir"])
    hf_cfg, imported = load_hf(path, scan_layers=False)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads) == (64, 96, 2)
    assert cfg.dtype == "float32"  # numerics from the gin model, architecture from HF
    # A zero learning rate leaves the imported weights exactly as they were.
    jax.tree.map(np.testing.assert_array_equal, trained, imported)


def _sft_job(workdir, learning_rate=1e-3, **kwargs):
    return sft.train_sft(str(workdir), CFG, 2, ReverseTask(8, 16),
                         optimizer=train_state.OptimizerConfig(learning_rate=learning_rate),
                         async_checkpoints=False, **kwargs)


def test_a_finished_stage_rerun_skips_and_a_changed_learning_rate_is_refused(tmp_path, capsys):
    from xwin_jax import jobs
    from xwin_jax.train.stage import StageChanged

    first = _sft_job(tmp_path)
    assert _sft_job(tmp_path) == first
    assert "[sft] already finished with these settings" in capsys.readouterr().out
    with pytest.raises(StageChanged) as err:
        _sft_job(tmp_path, learning_rate=1e-2)
    assert "optimizer.learning_rate: 0.001 → 0.01" in str(err.value)
    assert "--gin.jobs.run.overwrite=True" in err.value.hint
    rerun = jobs.run(lambda: _sft_job(tmp_path, learning_rate=1e-2), None, overwrite=True)
    assert rerun["final_metrics"]["learning_rate"] != first["final_metrics"]["learning_rate"]
    # A setting that does not change the result is not part of the fingerprint.
    assert _sft_job(tmp_path, learning_rate=1e-2, checkpoint_every=1) == rerun


def test_sft_from_a_checkpoint_uses_its_vocabulary_and_passes_it_on(tmp_path):
    """No vocabulary given: the data is tokenized with the checkpoint's tokenizer and the
    export records it; a vocabulary larger than the embedding is refused with both sizes."""
    from test_vocabulary import train_sentencepiece

    from xwin_jax.checkpoints.params import save_params
    from xwin_jax.data import formats
    from xwin_jax.data.sft_data import SftData
    from xwin_jax.data.vocabulary import (ByteVocabulary, SentencePieceVocabulary,
                                          load_vocabulary)
    from xwin_jax.errors import ConfigError

    vocab = SentencePieceVocabulary(train_sentencepiece(str(tmp_path)))
    base = str(tmp_path / "base")
    cfg = CFG.replace(vocab_size=vocab.vocab_size)
    save_params(base, cfg, llama.init_params(cfg, jax.random.key(0)), vocabulary=vocab)
    conversations = tmp_path / "chat.jsonl"
    formats.write_jsonl(str(conversations), [
        {"conversations": [{"from": "human", "value": f"say {w}"},
                           {"from": "gpt", "value": f"{w} {w}"}]}
        for w in ("hello", "world", "token", "model") * 16])
    data = SftData([str(conversations)], seq_len=256, batch_size=8)
    summary = sft.train_sft(str(tmp_path), CFG, 1, data, init_dir=base,
                            async_checkpoints=False)
    assert load_vocabulary(summary["export_dir"]) == vocab
    bound = data.with_vocabulary(vocab)
    assert bound.vocab is vocab and int(bound.global_batch(0)["input_tokens"].max()) < \
        vocab.vocab_size
    small = str(tmp_path / "small")
    small_cfg = CFG.replace(vocab_size=300)
    save_params(small, small_cfg, llama.init_params(small_cfg, jax.random.key(0)),
                vocabulary=ByteVocabulary())
    with pytest.raises(ConfigError, match=r"400 ids but the model's embedding has 300"):
        sft.train_sft(str(tmp_path / "other"), CFG, 1, data, init_dir=small,
                      vocabulary=vocab.model_file)
