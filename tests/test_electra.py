"""ELECTRA (discriminator) in Flax against the reference implementation (HF transformers, PyTorch).

Fixtures come from tests/fixtures/make_electra_fixtures.py; no torch is needed here. The
tiny fixture has embedding_size 24 != hidden_size 32, so `embeddings_project` is checked.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import common
from ftjax import convert, methods, models, train
from ftjax import step as step_lib
from ftjax import tree as tree_lib
from ftjax.convert import electra as electra_convert
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError
from ftjax.models import electra
from ftjax.tasks import classification
from tests import family_checks
from tests.family_checks import TASK2

TINY_DIR = family_checks.FIXTURES / "electra_tiny_random"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

ref = family_checks.reference_fixture("electra")


def _encoder():
    return family_checks.encoder_fn("electra", TINY_DIR)


# ---- parity with transformers ----------------------------------------------------------


def test_tiny_random_hidden_states_and_pooled_output_match_pytorch(ref):
    seq, pooled = _encoder()(*(ref[k] for k in INPUTS))
    assert seq.shape == (3, 11, 32)  # projected from embedding_size 24 to hidden_size 32
    family_checks.assert_close_on_tokens(seq, ref["last_hidden_state"], ref["attention_mask"], 1e-4)
    np.testing.assert_allclose(pooled, ref["pooler_output"], atol=1e-4)  # gelu(classifier.dense(first))


@pytest.fixture(scope="module")
def classifier_outputs(ref):
    """Fixture-model logits in eval mode, in train mode (two dropout keys) and in bfloat16: one compile."""
    # the HF head converts too (classifier.dense -> pooler, out_proj -> head): nothing excused
    model, params = family_checks.converted_classifier("electra", TINY_DIR)
    half = classification.build_classifier("electra", models.load_hf_config(TINY_DIR), num_labels=3,
                                           dtype="bfloat16")

    @jax.jit
    def run(params, key, i, m, t):
        v = {"params": params}
        return (model.apply(v, i, m, t), model.apply(v, i, m, t, train=True, rngs={"dropout": key}),
                half.apply(v, i, m, t))

    inputs = (ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    first = run(params, jax.random.key(1), *inputs)
    second = run(params, jax.random.key(2), *inputs)
    return ref, first, second


def test_tiny_random_classifier_logits_match_pytorch(classifier_outputs):
    ref, (logits, _, _), _ = classifier_outputs
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_dropout_only_in_training_and_bf16(classifier_outputs):
    _, (eval1, train1, half), (eval2, train2, _) = classifier_outputs
    np.testing.assert_array_equal(eval1, eval2)
    assert not np.allclose(train1, eval1) and not np.allclose(train1, train2)
    # bfloat16 keeps ~3 significant digits: within 5% of the logits' scale (the tiny random
    # model's logits reach ~3.7; a float32-only path would be exact)
    assert half.dtype == jnp.float32 and np.abs(half - eval1).max() < 0.05 * np.abs(eval1).max()
    assert not np.array_equal(half, eval1)


def test_padding_does_not_change_real_tokens(ref):
    family_checks.assert_padding_changes_nothing(_encoder(), [ref[k] for k in INPUTS])


def test_variants_and_config():
    small = electra.ElectraConfig.from_hf(models.variant_config("electra", "small"))
    assert (small.embedding_size, small.hidden_size, small.num_hidden_layers, small.num_attention_heads,
            small.intermediate_size, small.vocab_size) == (128, 256, 12, 4, 1024, 30522)
    base = electra.ElectraConfig.from_hf(models.variant_config("electra", "base"))
    assert base.embedding_size == base.hidden_size == 768
    tiny = electra.ElectraConfig.from_hf(electra.TINY_ELECTRA)
    assert tiny.vocab_size >= 40 and tiny.embedding_size != tiny.hidden_size
    # equal widths: no projection (as HF, which then has no embeddings_project tensors)
    shapes = jax.eval_shape(lambda: electra.ElectraModel(dataclasses.replace(tiny, embedding_size=32)).init(
        jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)))
    assert not any("embeddings_project" in p for p in tree_lib.flatten(shapes["params"]))


# ---- converter -------------------------------------------------------------------------


def test_fixture_converts_strictly_and_round_trips_through_to_hf():
    tensors = load_file(str(TINY_DIR / "model.safetensors"))
    flat = electra_convert.convert(tensors)
    assert "params/electra/embeddings_project/kernel" in flat and "params/electra/pooler/kernel" in flat
    np.testing.assert_array_equal(flat["params/electra/embeddings_project/kernel"],
                                  tensors["electra.embeddings_project.weight"].T)
    np.testing.assert_array_equal(flat["params/head/kernel"], tensors["classifier.out_proj.weight"].T)
    # the strict merge raises on any missing, unexpected or misshapen parameter
    _, merged = family_checks.converted_classifier("electra", TINY_DIR)
    assert len(tree_lib.flatten(merged)) == len(flat) == len(tensors)
    back = electra_convert.to_hf({k[len("params/"):]: v for k, v in flat.items()})
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_pretraining_heads_and_buffers_are_skipped_and_unknown_names_refused():
    tensors = {k: v for k, v in load_file(str(TINY_DIR / "model.safetensors")).items()
               if not k.startswith("classifier.")}
    extra = {"discriminator_predictions.dense.weight": np.zeros((32, 32), np.float32),
             "discriminator_predictions.dense_prediction.bias": np.zeros((1,), np.float32),
             "generator_predictions.LayerNorm.weight": np.zeros((24,), np.float32),
             "generator_lm_head.bias": np.zeros((99,), np.float32),
             "electra.embeddings.position_ids": np.arange(40)[None]}
    flat = electra_convert.convert({**tensors, **extra})
    assert len(flat) == len(tensors)  # every encoder tensor, nothing else (no pooler, no head)
    assert not any("pooler" in p or p.startswith("params/head/") for p in flat)
    # a bare ElectraModel file (no "electra." prefix) maps the same
    bare = electra_convert.convert({k[len("electra."):]: v for k, v in tensors.items()})
    assert sorted(bare) == sorted(flat)
    with pytest.raises(ConvertError, match=r"unknown tensor 'electra.encoder.layer.0.crossattention.q.weight'"):
        electra_convert.convert({**tensors, "electra.encoder.layer.0.crossattention.q.weight": np.zeros(2)})
    with pytest.raises(ConvertError, match="unknown tensor 'qa_outputs.weight'") as e:
        electra_convert.convert({"qa_outputs.weight": np.zeros(2)})
    assert "\n" not in str(e.value)
    with pytest.raises(ConvertError, match="has no place in an HF ELECTRA checkpoint"):
        electra_convert.to_hf({"electra/encoder/layer_0/attention/lora_a": np.zeros(2)})


def test_generator_only_checkpoint_is_one_clear_line(tmp_path):
    heads = {"generator_predictions.dense.weight": np.zeros((24, 32), np.float32),
             "generator_predictions.LayerNorm.weight": np.zeros((24,), np.float32),
             "generator_lm_head.weight": np.zeros((99, 24), np.float32)}
    save_file(heads, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConvertError, match="only generator heads.*electra-small-discriminator") as e:
        convert.convert_folder(tmp_path, family="electra")
    assert "\n" not in str(e.value)


def test_bad_configs_are_one_line():
    with pytest.raises(UserError, match="not divisible by num_attention_heads"):
        electra.ElectraConfig.from_hf(dict(electra.TINY_ELECTRA, num_attention_heads=3))
    with pytest.raises(UserError, match="embedding_size=0"):
        electra.ElectraConfig.from_hf(dict(electra.TINY_ELECTRA, embedding_size=0))
    with pytest.raises(UserError, match="pooling=pooler to export"):
        electra.FAMILY.hf_export.check({"pooling": "mean"})
    electra.FAMILY.hf_export.check({"pooling": "pooler"})


# ---- methods ---------------------------------------------------------------------------

# The tiny variant's sizes, for the closed-form counts.
V, E, H, L, I, P, T = 128, 16, 32, 2, 64, 64, 2
HEAD = H * 2 + 2
EMBEDDINGS = (V + P + T) * E + 2 * E + E * H + H  # the tables, their LayerNorm and embeddings_project
LAYER = 4 * (H * H + H) + 2 * 2 * H + H * I + I + I * H + H
TOTAL = EMBEDDINGS + L * LAYER + H * H + H + HEAD
NORMS = L * 2 * 2 * H + 2 * E


def _adapter(a):
    return H * a + a + a * H + H


# (method, method_args, closed-form trainable count); every method of ftjax.methods appears.
METHOD_CASES = [
    ("full", {}, TOTAL),
    ("full", {"layerwise_lr_decay": 0.5}, TOTAL),
    ("linear_probe", {}, HEAD),
    ("freeze", {"freeze_bottom_k": 1}, TOTAL - EMBEDDINGS - LAYER),
    ("gradual_unfreezing", {"unfreeze_every_steps": 2}, TOTAL),
    ("bitfit", {}, L * (4 * H + H + I + H + H) + E + H + H + HEAD),
    ("layernorm", {}, NORMS + HEAD),
    ("lora", {"lora_rank": 4}, L * 2 * (H * 4 + 4 * H) + HEAD),
    ("ia3", {}, L * (H + H + I) + HEAD),
    ("adapter", {"adapter_size": 4}, L * 2 * _adapter(4) + NORMS + HEAD),
    ("adapter", {"adapter_kind": "pfeiffer", "adapter_size": 4}, L * _adapter(4) + NORMS + HEAD),
    ("prompt", {"prompt_tokens": 3}, 3 * E + HEAD),  # the prompt sits before the projection
    ("prefix", {"prefix_tokens": 3}, 3 * L * 2 * H + HEAD),
    ("prefix", {"prefix_tokens": 2, "prefix_reparam": 8}, 2 * H + H * 8 + 8 + 8 * L * 2 * H + L * 2 * H + HEAD),
]
# One case per method for the train steps: the first of each in METHOD_CASES, except that
# full runs with layer-wise lr decay.
STEP_CASES = {"full": {"layerwise_lr_decay": 0.5}}
for _m, _a, _ in METHOD_CASES:
    STEP_CASES.setdefault(_m, _a)
STEPS = 2  # zero-initialised factors (LoRA B, adapter up) give their partners a gradient from step 2


_config = family_checks.method_config


def _layout():
    return models.layout("electra", electra.TINY_ELECTRA)


def _model(c, dropout=None):
    """The tiny classifier with the method's additions; `dropout` (attention dropout too) when set."""
    hf = electra.TINY_ELECTRA if dropout is None else dict(electra.TINY_ELECTRA, attention_probs_dropout_prob=dropout)
    return classification.build_classifier("electra", hf, num_labels=2, peft=methods.peft(c), dropout=dropout)


def _batch(seed):
    rs = np.random.RandomState(seed)
    return {"input_ids": rs.randint(5, V, (4, 6)).astype(np.int32), "attention_mask": np.ones((4, 6), np.int32),
            "token_type_ids": np.zeros((4, 6), np.int32), "label": rs.randint(0, 2, (4,)).astype(np.int32)}


def test_every_method_is_covered():
    assert set(STEP_CASES) == {m for m, _, _ in METHOD_CASES} == set(methods.METHODS)


@pytest.mark.parametrize("method,args,expected", METHOD_CASES)
def test_trainable_counts_match_the_closed_form(method, args, expected):
    trainable, _ = family_checks.trainable_counts("electra", electra.TINY_ELECTRA, _config(method, **args))
    assert trainable == expected


@pytest.fixture(scope="module")
def stepped():
    """Every method's (optimizer, params before, state after STEPS train steps, losses).

    All methods' train steps run in one jitted function, with dropout off (random bits
    are slow to compile): one compile instead of one per method keeps this module fast on
    a CPU. The end-to-end test trains with dropout.
    """
    b = _batch(0)
    configs = [_config(method, **args) for method, args in STEP_CASES.items()]
    models_ = [_model(c, dropout=0.0) for c in configs]
    # All inits in one compile; the "unsafe_rbg" generator compiles much faster than threefry.
    init = jax.jit(lambda key, *x: [m.init(key, *x)["params"] for m in models_])
    all_params = init(jax.random.key(0, impl="unsafe_rbg"), b["input_ids"], b["attention_mask"], b["token_type_ids"])
    opts = [family_checks.method_optimizer(c, _layout(), params) for c, params in zip(configs, all_params)]
    befores = [{k: np.asarray(v).copy() for k, v in tree_lib.flatten(params).items()} for params in all_params]
    states = [family_checks.train_state(params, opt.tx) for params, opt in zip(all_params, opts)]
    steps = [step_lib.make_train_step(model, opt.tx, TASK2, trainable=opt.mask) for model, opt in zip(models_, opts)]
    fn = jax.jit(lambda ss, batch: tuple(step(s, batch) for step, s in zip(steps, ss)))
    losses = []
    for s in range(STEPS):
        out = fn(tuple(states), _batch(s))
        states = [state for state, _ in out]
        losses.append([float(m["loss"]) for _, m in out])
    return {method: (opt, before, state, [row[i] for row in losses])
            for i, (method, opt, before, state) in enumerate(zip(STEP_CASES, opts, befores, states))}


@pytest.mark.parametrize("method", list(STEP_CASES))
def test_method_trains_what_its_rules_say(method, stepped):
    opt, before, state, losses = stepped[method]
    assert np.all(np.isfinite(losses))
    # frozen or not yet started: bitwise equal; trainable: moved; Adam moments for the trainable leaves only
    family_checks.assert_trains_exactly(method, opt, before, state.params, state.opt_state, STEPS)


def test_embeddings_project_is_in_the_embeddings_group():
    layout = _layout()
    c = _config("full", layerwise_lr_decay=0.5)
    _, lr_rules = methods.rules(c, layout)
    shapes = jax.eval_shape(lambda: classification.build_classifier(
        "electra", electra.TINY_ELECTRA, num_labels=2).init(jax.random.key(0), *(jnp.ones((1, 4), jnp.int32),) * 3))
    mults = tree_lib.flatten(tree_lib.tree_from_rules(shapes["params"], lr_rules))
    assert mults["head/kernel"] == 1.0 and mults["electra/pooler/kernel"] == 1.0
    assert mults["electra/encoder/layer_1/attention/query/kernel"] == 0.5
    assert mults["electra/encoder/layer_0/output/bias"] == 0.25
    assert mults["electra/embeddings/word_embeddings/embedding"] == 0.125
    assert mults["electra/embeddings_project/kernel"] == mults["electra/embeddings_project/bias"] == 0.125
    frozen = tree_lib.flatten(tree_lib.tree_from_rules(
        shapes["params"], methods.rules(_config("freeze", freeze_bottom_k=1), layout)[0]))
    assert not frozen["electra/embeddings_project/kernel"] and frozen["electra/encoder/layer_1/output/kernel"]
    assert not frozen["electra/encoder/layer_0/output/kernel"]


def test_prompt_starts_from_vocabulary_embeddings(stepped):
    # the prompt lives before embeddings_project: vocabulary rows (embedding_size wide) fit it
    before = stepped["prompt"][1]
    params = tree_lib.unflatten(before)
    out = methods.post_load(_config("prompt", **STEP_CASES["prompt"]), params, tokenizer=None)
    words = np.asarray(out["electra"]["embeddings"]["word_embeddings"]["embedding"])
    assert out["electra"]["prompt"].shape == (STEP_CASES["prompt"]["prompt_tokens"], E)
    for row in np.asarray(out["electra"]["prompt"]):
        assert any(np.array_equal(row, w) for w in words[64:])
    assert not np.array_equal(out["electra"]["prompt"], before["electra/prompt"])


# ---- end to end ------------------------------------------------------------------------


files = family_checks.files_fixture()


def _discriminator_folder(folder: pathlib.Path) -> pathlib.Path:
    """The tiny fixture as a discriminator checkpoint: no classifier, a replaced-token head."""
    folder.mkdir()
    tensors = {k: v for k, v in load_file(str(TINY_DIR / "model.safetensors")).items()
               if not k.startswith("classifier.")}
    tensors["discriminator_predictions.dense.weight"] = np.zeros((32, 32), np.float32)
    tensors["discriminator_predictions.dense_prediction.weight"] = np.zeros((1, 32), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    hf = json.loads((TINY_DIR / "config.json").read_text())
    hf["architectures"] = ["ElectraForPreTraining"]
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def test_pooler_loads_when_present_and_is_optional_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    family = models.family("electra")
    model = classification.build_classifier("electra", models.load_hf_config(TINY_DIR), num_labels=3)
    x = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, x))
    fresh = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)
    c = common.base_config()
    c.model.dont_load = ()
    # a fine-tuned ElectraForSequenceClassification: its classifier.dense is the pooler, out_proj the head
    loaded = tree_lib.flatten(train.load_pretrained_variables(c, family, TINY_DIR, fresh)["params"])
    tensors = load_file(str(TINY_DIR / "model.safetensors"))
    np.testing.assert_array_equal(loaded["electra/pooler/kernel"], tensors["classifier.dense.weight"].T)
    np.testing.assert_array_equal(loaded["head/bias"], tensors["classifier.out_proj.bias"])
    # a discriminator checkpoint: no classifier, so the pooler keeps its init (the head: dont_load)
    c.model.dont_load = ("head/.*",)
    disc = _discriminator_folder(tmp_path / "disc")
    loaded = tree_lib.flatten(train.load_pretrained_variables(c, family, disc, fresh)["params"])
    assert np.all(loaded["electra/pooler/kernel"] == 7.0) and np.all(loaded["head/kernel"] == 7.0)
    np.testing.assert_array_equal(loaded["electra/embeddings_project/kernel"],
                                  tensors["electra.embeddings_project.weight"].T)


def test_fine_tunes_a_discriminator_checkpoint_and_exports_to_hf(files, tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    pretrained = _discriminator_folder(tmp_path / "disc")
    # 4 steps over both train buckets; the HF folder converts back to exactly the exported params
    run = family_checks.train_and_export(files, tmp_path, "electra", 4, "ElectraForSequenceClassification",
                                         **{"model.pretrained": str(pretrained), "data.bucket_lengths": (8, 16)})
    assert 0.0 <= run.summary["dev"]["accuracy"] <= 1.0
    losses = [json.loads(r)["train/loss"] for r in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    flat = tree_lib.flatten(run.params)
    # the encoder came from the checkpoint (fine-tuning moved it a little), the pooler was initialised
    word = load_file(str(pretrained / "model.safetensors"))["electra.embeddings.word_embeddings.weight"]
    assert np.abs(np.asarray(flat["electra/embeddings/word_embeddings/embedding"]) - word).max() < 0.05
    assert run.hf["num_labels"] == 2
    exported = load_file(str(run.hf_dir / "model.safetensors"))
    assert {k for k in exported if k.startswith("classifier.")} == set(electra_convert._HEAD)
