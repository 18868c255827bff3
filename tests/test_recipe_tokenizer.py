"""The README's step-by-step recipe on an HF Llama that ships its own tokenizer: every job runs
from the run files with no VOCABULARY flag, decodes with that tokenizer, passes it on to the
checkpoints it writes, and the export loads in AutoTokenizer with the same ids. Run for a
SentencePiece tokenizer.model and for a tokenizer.json-only directory."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import make_hf_model
from test_vocabulary import (BPE_CONFIG, assert_same_ids, train_sentencepiece,
                             write_bpe_tokenizer)

from xwin_jax import launch, sampling
from xwin_jax.checkpoints.params import load_params
from xwin_jax.data import converters, formats, synthetic
from xwin_jax.data.vocabulary import ByteVocabulary, get_vocabulary, load_vocabulary
from xwin_jax.errors import ConfigError

MODEL = ["models/tiny.gin", "mesh/single.gin"]
STAGES = ("sft", "reward", "rejection", "ppo", "dpo")


def hf_dir_with_tokenizer(root, kind):
    """A random tiny HF Llama whose embedding fits its tokenizer, with the tokenizer files."""
    directory = os.path.join(root, "hf_in")
    os.makedirs(directory)
    if kind == "sentencepiece":
        train_sentencepiece(directory)
    else:
        write_bpe_tokenizer(directory, config=BPE_CONFIG)
    vocab = get_vocabulary(directory)
    make_hf_model(vocab_size=vocab.vocab_size, max_position_embeddings=512).save_pretrained(
        directory)
    return directory, vocab


def job(files, bindings=(), **macros):
    """One job as `python -m xwin_jax.launch` runs it: macros (--gin.NAME=value), then
    bindings."""
    return launch.run_gin_job(MODEL + files, [f"{name} = {value!r}" for name, value in
                                              macros.items()] + list(bindings))


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizer_json"])
def recipe(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(request.param))
    hf_in, vocab = hf_dir_with_tokenizer(root, request.param)
    suite = synthetic.write_suite(os.path.join(root, "data"), seed=0, num_prompts=200)
    prompts = os.path.join(root, "prompts.jsonl")
    formats.write_jsonl(prompts, [json.loads(line) for line in
                                  open(suite["prompts_train"])][:8])
    r = os.path.join(root, "run")
    base, sft, reward = (os.path.join(r, *p) for p in (("base",), ("sft", "final"),
                                                       ("reward", "final")))
    job(["runs/convert.gin"], DIRECTION="import", HF_DIR=hf_in, CKPT_DIR=base)
    job(["runs/sft.gin"], WORKDIR=r, TRAIN_STEPS=2, BATCH_SIZE=4, SEQ_LEN=256,
        TRAIN_FILES=[suite["sft_train"]], INIT_DIR=base, LEARNING_RATE=1e-3)
    job(["runs/annotate.gin"], CKPT_DIR=sft, PROMPTS=prompts,
        OUTPUT_DIR=os.path.join(r, "xwin_pair"),
        bindings=("pairs.annotate_job.num_responses = 2",
                  "pairs.annotate_job.max_new_tokens = 8", "pairs.annotate_job.batch_size = 8"))
    job(["runs/reward.gin"], WORKDIR=r, TRAIN_STEPS=2, BATCH_SIZE=4, SEQ_LEN=256,
        TRAIN_PAIRS=[suite["pairs_train"]], LEARNING_RATE=1e-3,
        bindings=(f"reward.train_reward.init_dir = {sft!r}",))
    job(["runs/rejection.gin"], WORKDIR=r, TRAIN_STEPS=1, PROMPTS=prompts, POLICY_DIR=sft,
        REWARD_DIR=reward, NUM_SAMPLES=4, bindings=(
            "rejection.train_rejection.max_new_tokens = 16",
            "rejection.train_rejection.sample_batch_size = 16",
            "rejection.train_rejection.batch_size = 1",  # a random policy rarely finishes
            "rejection.train_rejection.seq_len = 256"))
    job(["runs/ppo.gin"], WORKDIR=r, TRAIN_STEPS=1, BATCH_SIZE=4, PROMPTS=prompts,
        POLICY_DIR=sft, REWARD_DIR=reward, MAX_PROMPT_LEN=128, bindings=(
            "ppo.train_ppo.ppo = @ppo.PPOConfig()", "ppo.PPOConfig.max_new_tokens = 8",
            "ppo.PPOConfig.epochs = 1", "ppo.PPOConfig.num_minibatches = 1"))
    job(["runs/dpo.gin"], WORKDIR=r, TRAIN_STEPS=1, BATCH_SIZE=4, SEQ_LEN=256,
        TRAIN_PAIRS=[suite["pairs_train"]], POLICY_DIR=sft, LEARNING_RATE=1e-4)
    generated = os.path.join(r, "generate")
    job(["runs/generate.gin"], CKPT_DIR=os.path.join(r, "dpo", "final"), PROMPTS=prompts,
        OUTPUT_DIR=generated, bindings=("generate.generate_job.max_new_tokens = 12",
                                        "generate.generate_job.temperature = 0.0"))
    outputs = os.path.join(generated, "alpaca_eval.json")
    evaluation = job(["runs/evaluate.gin"], MODEL_OUTPUTS=outputs, REFERENCE_OUTPUTS=outputs,
                     OUTPUT_DIR=os.path.join(r, "evaluate"), REWARD_DIR=reward)
    export = os.path.join(r, "hf_out")
    job(["runs/convert.gin"], DIRECTION="export", CKPT_DIR=os.path.join(r, "dpo", "final"),
        HF_DIR=export)
    return {"root": root, "run": r, "vocab": vocab, "prompts": prompts, "export": export,
            "generated": generated, "evaluation": evaluation, "base": base}


def test_every_checkpoint_records_the_tokenizer_it_started_from(recipe):
    vocab = recipe["vocab"]
    assert load_vocabulary(recipe["base"]) == vocab
    for stage in STAGES:
        assert load_vocabulary(os.path.join(recipe["run"], stage, "final")) == vocab, stage
    assert load_vocabulary(os.path.join(recipe["run"], "ppo", "final_value")) == vocab
    assert recipe["evaluation"]["rm_mean_reward"] is not None


def raw_decode(directory, ids):
    """The tokenizer files' own library decoding `ids` (sentencepiece, or tokenizers for a
    tokenizer.json): independent of the project's wrappers."""
    model = os.path.join(directory, "tokenizer.model")
    if os.path.exists(model):
        import sentencepiece
        return sentencepiece.SentencePieceProcessor(model_file=model).decode(ids)
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).decode(
        ids, skip_special_tokens=True)


def test_generation_decodes_with_the_checkpoint_tokenizer(recipe):
    """The generate job's text for a prompt is what the exported tokenizer files decode from
    the same greedy ids (with the byte vocabulary it used to be "" for every prompt)."""
    vocab = recipe["vocab"]
    cfg, params = load_params(os.path.join(recipe["run"], "dpo", "final"))
    prompt = formats.read_prompts(recipe["prompts"]).records[0]
    ids = converters.prompt_ids(prompt.conversation, vocab, 1024)
    result = sampling.generate(params, cfg.replace(dtype="float32"), [ids], [[1] * len(ids)],
                               jax.random.key(0), max_new_tokens=12, temperature=0.0,
                               stop_ids=(vocab.eos_id,), pad_id=vocab.pad_id)
    n = int(result.lengths[0])
    tokens = [int(t) for t in np.asarray(result.tokens[0, :n])
              if t not in (vocab.eos_id, vocab.pad_id)]
    expected = raw_decode(recipe["export"], tokens)
    outputs = [json.loads(line) for line in open(os.path.join(recipe["generated"],
                                                               "outputs.jsonl"))]
    first = next(o for o in outputs if o["index"] == 0)
    assert first["num_tokens"] == n and tokens
    assert first["output"] == expected != ByteVocabulary().decode(tokens)


def test_the_export_loads_in_autotokenizer_with_the_same_ids(recipe):
    assert_same_ids(recipe["vocab"], recipe["export"])
    config = json.load(open(os.path.join(recipe["export"], "generation_config.json")))
    assert (config["bos_token_id"], config["eos_token_id"]) == (recipe["vocab"].bos_id,
                                                                recipe["vocab"].eos_id)


def test_a_vocabulary_that_does_not_fit_the_embedding_is_refused(recipe, tmp_path):
    bigger = train_sentencepiece(str(tmp_path), vocab_size=recipe["vocab"].vocab_size + 100)
    suite = os.path.join(recipe["root"], "data", "sft_train.jsonl")
    with pytest.raises(ConfigError, match=rf"{recipe['vocab'].vocab_size + 100} ids but the "
                                          rf"model's embedding has "
                                          rf"{recipe['vocab'].vocab_size}"):
        job(["runs/sft.gin"], WORKDIR=str(tmp_path / "w"), TRAIN_STEPS=1, BATCH_SIZE=4,
            SEQ_LEN=256, TRAIN_FILES=[suite], INIT_DIR=recipe["base"], VOCABULARY=bigger)
