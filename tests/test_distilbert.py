"""DistilBERT in Flax against outputs of the reference implementation (HF transformers, PyTorch).

Fixtures come from tests/fixtures/make_distilbert_fixtures.py; no torch is needed here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import common
from ftjax import convert, methods, models, train, tree
from ftjax.convert import distilbert as distilbert_convert
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError, one_line
from ftjax.models import distilbert
from ftjax.models.layers import Peft
from ftjax.tasks import classification
from tests import family_checks
from tests.family_checks import TASK2, assert_close_on_tokens

FOLDER = family_checks.FIXTURES / "distilbert_tiny_random"
TINY = distilbert.TINY_DISTILBERT

ref = family_checks.reference_fixture("distilbert")


@pytest.fixture(scope="module")
def hf_config():
    return models.load_hf_config(FOLDER)


@pytest.fixture(scope="module")
def classifier():
    """(3-label classifier on the fixture's config, converted params, jitted fn -> (seq, pooled, logits)).

    One compile per input shape gives the encoder's outputs and the logits together.
    """
    # strict merge against the model's structure: the HF head is converted too, nothing excused
    model, params = family_checks.converted_classifier("distilbert", FOLDER)

    @jax.jit
    def run(p, ids, mask, types):
        logits, state = model.apply({"params": p}, ids, mask, types, capture_intermediates=True,
                                    mutable=["intermediates"])
        seq, pooled = state["intermediates"]["distilbert"]["__call__"][0]
        return seq, pooled, logits

    return model, params, run


def test_tiny_random_hidden_states_pre_classifier_and_logits_match_pytorch(ref, classifier):
    model, params, run = classifier
    assert model.head_dropout == 0.2  # seq_classif_dropout, not the hidden dropout
    seq, pooled, logits = run(params, ref["input_ids"], ref["attention_mask"], np.zeros_like(ref["input_ids"]))
    assert_close_on_tokens(seq, ref["last_hidden_state"], ref["attention_mask"], 1e-4)
    np.testing.assert_allclose(pooled, ref["pooler_output"], atol=1e-4)
    assert (np.asarray(pooled) == 0).any() and (np.asarray(pooled) > 0).any()  # the ReLU acted
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)
    # DistilBERT has no segment embeddings: token types change nothing
    types = np.random.RandomState(0).randint(0, 2, ref["input_ids"].shape)
    for a, b in zip((seq, pooled, logits), run(params, ref["input_ids"], ref["attention_mask"], types)):
        np.testing.assert_array_equal(a, b)


def test_padding_does_not_change_real_tokens(ref, classifier):
    _, params, run = classifier
    ids, mask = (np.pad(ref[k], ((0, 0), (0, 5))) for k in ("input_ids", "attention_mask"))
    seq, pooled, logits = run(params, ids, mask, np.zeros_like(ids))
    assert_close_on_tokens(np.asarray(seq)[:, :11], ref["last_hidden_state"], ref["attention_mask"], 1e-4)
    np.testing.assert_allclose(pooled, ref["pooler_output"], atol=1e-4)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_fresh_init_has_hf_sinusoidal_positions_and_a_zero_padding_row(ref, hf_config):
    np.testing.assert_allclose(distilbert.sinusoidal_table(40, 32), ref["sinusoidal_table"], atol=1e-6)
    ids = jnp.ones((1, 4), jnp.int32)
    cfg = distilbert.DistilBertConfig.from_hf(hf_config)
    emb = distilbert.Embeddings(cfg, 0.0).init(jax.random.key(0), ids, train=False)["params"]
    np.testing.assert_allclose(emb["position_embeddings"]["embedding"], ref["sinusoidal_table"], atol=1e-6)
    words = np.asarray(emb["word_embeddings"]["embedding"])
    assert not words[0].any() and words[1:].std() > 0.01
    learned = distilbert.DistilBertConfig.from_hf(TINY)  # sinusoidal_pos_embds false: random positions
    table = distilbert.Embeddings(learned, 0.0).init(jax.random.key(0), ids, train=False)["params"][
        "position_embeddings"]["embedding"]
    assert table.shape == (64, 32) and abs(float(np.std(table)) - 0.02) < 0.005


def test_converter_round_trips_and_skips_the_lm_head():
    tensors = convert.read_weights(FOLDER)
    flat = distilbert_convert.convert(tensors)
    assert "params/distilbert/pooler/kernel" in flat and "params/head/bias" in flat
    back = distilbert_convert.to_hf({k[len("params/"):]: v for k, v in flat.items()})
    assert back.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
    # a bare DistilBertModel file (no prefix) with masked-LM extras maps to the same paths
    bare = {k[len("distilbert."):]: v for k, v in tensors.items() if k.startswith("distilbert.")}
    bare.update({"vocab_transform.weight": np.zeros((32, 32)), "vocab_projector.bias": np.zeros(99),
                 "embeddings.position_ids": np.arange(40)[None]})
    got = distilbert_convert.convert(bare)
    assert got.keys() == {k for k in flat if k.startswith("params/distilbert/") and "/pooler/" not in k}
    kernel = "params/distilbert/encoder/layer_1/attention/query/kernel"
    np.testing.assert_array_equal(got[kernel], tensors["distilbert.transformer.layer.1.attention.q_lin.weight"].T)


@pytest.mark.parametrize("name", ["distilbert.transformer.layer.0.attention.q_lin.scale",
                                  "distilbert.transformer.layer.0.attention.z_lin.weight", "pooler.dense.weight"])
def test_unknown_tensor_is_one_convert_error_line(name):
    with pytest.raises(ConvertError) as e:
        distilbert_convert.convert({name: np.zeros((2, 2))})
    assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(ConvertError, match="no place in an HF DistilBERT"):
        distilbert_convert.to_hf({"distilbert/encoder/layer_0/attention/ia3_key": np.zeros(2)})


def test_masked_lm_checkpoint_without_pre_classifier_loads_with_the_pooler_at_init(hf_config, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    init = family_checks.zeros_like_init(classification.build_classifier("distilbert", hf_config, num_labels=3))
    tensors = {k: v for k, v in convert.read_weights(FOLDER).items() if "classifier" not in k}
    tensors["vocab_projector.weight"] = tensors["distilbert.embeddings.word_embeddings.weight"]
    (tmp_path / "mlm").mkdir()
    save_file(tensors, str(tmp_path / "mlm" / "model.safetensors"))
    (tmp_path / "mlm" / "config.json").write_text((FOLDER / "config.json").read_text())
    spec = models.family("distilbert")
    loaded = train.load_pretrained_variables(common.base_config(), spec, tmp_path / "mlm",
                                             {"params": init})["params"]
    # no pre_classifier / classifier in the file: pooler and head keep their (here zero) init
    assert not loaded["distilbert"]["pooler"]["kernel"].any() and not loaded["head"]["kernel"].any()
    np.testing.assert_array_equal(loaded["distilbert"]["encoder"]["layer_0"]["output"]["kernel"],
                                  tensors["distilbert.transformer.layer.0.ffn.lin2.weight"].T)
    # the pooler is optional, the encoder is not
    del tensors["distilbert.transformer.layer.1.ffn.lin1.bias"]
    save_file(tensors, str(tmp_path / "mlm" / "model.safetensors"))
    with pytest.raises(UserError, match="layer_1/intermediate/bias"):
        train.load_pretrained_variables(common.base_config(), spec, tmp_path / "mlm",
                                        {"params": init})


# Closed-form trainable counts from the tiny config (args as in METHOD_CASES).
D, L, F = TINY["dim"], TINY["n_layers"], TINY["hidden_dim"]
V, P = TINY["vocab_size"], TINY["max_position_embeddings"]
HEAD = D * 2 + 2
EMBEDDINGS = V * D + P * D + 2 * D
LAYER = 4 * (D * D + D) + 2 * 2 * D + (D * F + F) + (F * D + D)
POOLER = D * D + D
TOTAL = EMBEDDINGS + L * LAYER + POOLER + HEAD
NORMS = L * 2 * 2 * D + 2 * D
METHOD_CASES = [
    ("full", {}, TOTAL),
    ("linear_probe", {}, HEAD),
    ("freeze", {"freeze_bottom_k": 1}, TOTAL - EMBEDDINGS - LAYER),
    ("gradual_unfreezing", {"unfreeze_every_steps": 1}, TOTAL),
    ("bitfit", {}, L * (4 * D + D + F + D + D) + D + D + HEAD),
    ("layernorm", {}, NORMS + HEAD),
    ("lora", {"lora_rank": 2}, L * 2 * (D * 2 + 2 * D) + HEAD),
    ("ia3", {}, L * (D + D + F) + HEAD),
    ("adapter", {"adapter_size": 4}, L * 2 * (D * 4 + 4 + 4 * D + D) + NORMS + HEAD),
    ("prompt", {"prompt_tokens": 3}, 3 * D + HEAD),
    ("prefix", {"prefix_tokens": 2}, 2 * L * 2 * D + HEAD),
]


def test_every_method_has_a_case():
    assert {m for m, _, _ in METHOD_CASES} == set(methods.METHODS)


LAYOUT = models.layout("distilbert", TINY)


@pytest.mark.parametrize("method,args,expected", METHOD_CASES, ids=[m for m, _, _ in METHOD_CASES])
def test_trainable_counts_match_the_closed_form(method, args, expected):
    # the method's own model, from shapes alone
    trainable, _ = family_checks.trainable_counts("distilbert", TINY, family_checks.method_config(method, **args))
    assert trainable == expected


@pytest.fixture(scope="module")
def every_addition():
    """A tiny classifier carrying every method's additions at once, its init and a jitted gradient.

    One forward/backward compile then serves every method: a method's rules freeze the
    other methods' additions like any other parameter, so what moves is still exactly
    what its rules say (test_methods.py runs each method's own model on BERT).
    """
    peft = Peft(lora_rank=2, ia3=True, adapter="houlsby", adapter_size=4, prompt_tokens=3, prefix_tokens=2)
    model = classification.build_classifier("distilbert", TINY, num_labels=2, peft=peft)
    rs = np.random.RandomState(0)
    batch = {"input_ids": rs.randint(5, TINY["vocab_size"], (4, 6)).astype(np.int32),
             "attention_mask": np.array([[1] * 6, [1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], np.int32),
             "label": np.array([0, 1, 1, 0], np.int32)}
    # Random values in the init's shapes (no init compile). Unlike the init they leave no
    # leaf at zero, so LoRA's A and the adapters' down projections get gradients at once.
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch["input_ids"], batch["attention_mask"])
    params = jax.tree.map(lambda s: jnp.asarray(rs.normal(0, 0.1, s.shape), s.dtype), shapes["params"])

    def loss(p):
        logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"], train=True,
                             rngs={"dropout": jax.random.key(1)})
        return TASK2.loss(logits, batch)[0]

    return params, jax.jit(jax.grad(loss))


@pytest.mark.parametrize("method,args", [(m, a) for m, a, _ in METHOD_CASES], ids=[m for m, _, _ in METHOD_CASES])
def test_method_moves_exactly_what_its_rules_say(method, args, every_addition):
    params, grad = every_addition
    opt = family_checks.method_optimizer(family_checks.method_config(method, **args), LAYOUT, params)
    # two updates of the method's optimizer (frozen leaves: set_to_zero); under gradual
    # unfreezing only groups starting at step <= 1 have moved
    new, opt_state = family_checks.optimizer_steps(opt, params, grad, 2)
    family_checks.assert_trains_exactly(method, opt, tree.flatten(params), new, opt_state, 2)


files = family_checks.files_fixture(train_rows=40)


def test_end_to_end_train_evaluate_and_hf_export(files, tmp_path):
    # 2 steps, one eval shape (one compile); our reader of HF folders (the inverse map) gives the export back
    run = family_checks.train_and_export(files, tmp_path, "distilbert", 2, "DistilBertForSequenceClassification")
    assert run.hf["model_type"] == "distilbert"
    assert run.hf["dim"] == TINY["dim"] and run.hf["n_layers"] == TINY["n_layers"]
    with pytest.raises(UserError, match="pools with 'cls'.*DistilBertForSequenceClassification"):
        models.family("distilbert").hf_export.check({**run.meta, "pooling": "cls"})


def test_family_spec_and_variants():
    spec = models.family("distilbert")
    assert spec.model_types == ("distilbert",) and spec.hf_export.model_type == "distilbert"
    base = spec.config(models.variant_config("distilbert", "base"))
    assert (base.n_layers, base.dim, base.n_heads, base.hidden_dim, base.vocab_size,
            base.max_position_embeddings) == (6, 768, 12, 3072, 30522, 512)
    assert spec.head_dropout(base) == base.seq_classif_dropout == 0.2
    assert spec.layout(base).num_layers == 6 and spec.variants["tiny"]["vocab_size"] >= 40
    # the BERT names the shared layers read
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size,
            base.hidden_act, base.layer_norm_eps) == (768, 6, 12, 3072, "gelu", 1e-12)


@pytest.mark.parametrize("change,words", [
    ({"activation": "mish"}, "activation='mish' is not supported"),
    ({"dim": 30, "n_heads": 4}, "dim 30 is not divisible by n_heads 4"),
])
def test_bad_config_is_one_user_error_line(change, words):
    with pytest.raises(UserError) as e:
        classification.build_classifier("distilbert", {**TINY, **change}, num_labels=2)
    assert words in str(e.value) and one_line(e.value) == str(e.value)


def test_sequence_longer_than_max_positions_is_one_user_error_line():
    model = classification.build_classifier("distilbert", TINY, num_labels=2)
    x = jnp.ones((1, TINY["max_position_embeddings"] + 1), jnp.int32)
    with pytest.raises(UserError) as e:
        jax.eval_shape(model.init, jax.random.key(0), x, x)
    assert "sequence length 65 exceeds" in str(e.value) and "max_position_embeddings 64" in str(e.value)
    assert one_line(e.value) == str(e.value)
