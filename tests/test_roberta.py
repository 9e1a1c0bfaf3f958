"""RoBERTa / XLM-R in Flax against the reference implementation (HF transformers, PyTorch), and in ftjax.

Fixtures come from tests/fixtures/make_roberta_fixtures.py; no torch is needed here.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import common
from ftjax import methods, models, train, tree
from ftjax.convert import roberta as roberta_convert
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError, one_line
from ftjax.models import roberta
from ftjax.models.layers import Peft
from ftjax.tasks import classification
from tests import family_checks
from tests.conftest import WORDS

MODEL_DIR = family_checks.FIXTURES / "roberta_tiny_random"
PAD = 1

ref = family_checks.reference_fixture("roberta")


def _encoder():
    """The fixture's encoder, jitted once: (input_ids, attention_mask) -> (sequence, pooled)."""
    return family_checks.encoder_fn("roberta", MODEL_DIR)


# ---- parity with transformers ---------------------------------------------------------------------------

def test_tiny_random_matches_pytorch(ref):
    seq, pooled = _encoder()(ref["input_ids"], ref["attention_mask"])
    family_checks.assert_close_on_tokens(seq, ref["last_hidden_state"], ref["attention_mask"], 1e-4)
    # every row, the left-padded one too (its <s> is not first: HF pools position 0 regardless)
    np.testing.assert_allclose(pooled, ref["pooled"], atol=1e-4)


def test_tiny_random_classifier_logits_match_pytorch(ref):
    # the converted checkpoint fits the model exactly: nothing missing, unexpected or excused
    model, params = family_checks.converted_classifier("roberta", MODEL_DIR)
    logits = jax.jit(model.apply)({"params": params}, ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_positions_count_real_tokens_after_the_padding_id():
    ids = jnp.array([[0, 7, 2, PAD, PAD], [PAD, PAD, 0, 7, 2]])
    np.testing.assert_array_equal(roberta.position_ids(ids, PAD), [[2, 3, 4, 1, 1], [1, 1, 2, 3, 4]])


def test_padding_does_not_change_real_tokens(ref):
    ids, mask = ref["input_ids"], ref["attention_mask"]
    (a, _), _, _ = family_checks.assert_padding_changes_nothing(_encoder(), (ids, mask), pad_id=PAD)
    # Row 2 is left-padded: its tokens alone, unpadded, give the same outputs, since positions skip padding.
    real = mask[2].astype(bool)
    alone, _ = _encoder()(ids[2:3, real], mask[2:3, real])
    np.testing.assert_allclose(alone[0], a[2, real], atol=1e-5)


def test_too_long_input_is_one_user_error():
    encoder_fn = _encoder()
    cfg = roberta.RobertaConfig.from_hf(models.load_hf_config(MODEL_DIR))
    assert cfg.max_length == 20 - PAD - 1  # max_position_embeddings 20
    ids = np.full((1, cfg.max_length), 5, np.int32)
    assert np.isfinite(encoder_fn(ids, np.ones_like(ids))[0]).all()  # the longest input still works
    long = np.full((1, cfg.max_length + 1), 5, np.int32)
    with pytest.raises(UserError) as e:
        encoder_fn(long, np.ones_like(long))
    msg = one_line(e.value)
    assert msg == str(e.value) and "sequence length 19" in msg and "data.max_length <= 18" in msg


def test_bad_configs_are_one_user_error():
    with pytest.raises(UserError, match="pad_token_id 70 must be"):
        roberta.RobertaConfig.from_hf({**roberta.TINY_ROBERTA, "pad_token_id": 70})
    with pytest.raises(UserError, match="only absolute"):
        roberta.RobertaConfig.from_hf({**roberta.TINY_ROBERTA, "position_embedding_type": "relative_key"})


def test_family_reads_roberta_and_xlm_roberta_configs():
    assert models.family_of({"model_type": "roberta"}, "x") == "roberta"
    assert models.family_of({"model_type": "xlm-roberta"}, "x") == "roberta"
    base = roberta.RobertaConfig.from_hf(models.variant_config("roberta", "base"))
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size,
            base.vocab_size, base.max_position_embeddings, base.type_vocab_size, base.layer_norm_eps,
            base.max_length) == (12, 768, 12, 3072, 50265, 514, 1, 1e-5, 512)
    large = roberta.RobertaConfig.from_hf(models.variant_config("roberta", "large"))
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)


# ---- converter ------------------------------------------------------------------------------------------

def test_converter_round_trips_and_refuses_unknown_names():
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    flat = roberta_convert.convert(tensors)
    assert flat["params/roberta/pooler/kernel"].shape == (32, 32) and flat["params/head/kernel"].shape == (32, 3)
    np.testing.assert_array_equal(flat["params/head/kernel"], tensors["classifier.out_proj.weight"].T)
    np.testing.assert_array_equal(flat["params/roberta/pooler/bias"], tensors["classifier.dense.bias"])
    back = roberta_convert.to_hf({k[len("params/"):]: v for k, v in flat.items()})
    assert sorted(back) == sorted(tensors)
    for name, arr in tensors.items():
        np.testing.assert_array_equal(back[name], arr, err_msg=name)
    # buffers and the masked-LM head are known and skipped
    extra = {"roberta.embeddings.position_ids": np.arange(20)[None], "lm_head.dense.weight": np.zeros((32, 32)),
             "lm_head.bias": np.zeros(50)}
    assert sorted(roberta_convert.convert({**tensors, **extra})) == sorted(flat)
    with pytest.raises(ConvertError) as e:
        roberta_convert.convert({**tensors, "roberta.encoder.layer.0.attention.self.rotary.weight": np.zeros(3)})
    assert "roberta.encoder.layer.0.attention.self.rotary.weight" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConvertError, match="classifier.weight"):
        roberta_convert.convert({"classifier.weight": np.zeros((2, 32))})
    with pytest.raises(ConvertError, match="no place in an HF RoBERTa"):
        roberta_convert.to_hf({"roberta/encoder/layer_0/attention/query/lora_a": np.zeros((32, 2))})


def _masked_lm_style(tensors):
    """A RobertaModel-style checkpoint: the pooler as roberta.pooler.dense, no classifier."""
    rename = {"classifier.dense.weight": "roberta.pooler.dense.weight",
              "classifier.dense.bias": "roberta.pooler.dense.bias"}
    return {rename.get(k, k): v for k, v in tensors.items() if not k.startswith("classifier.out_proj")}


def test_roberta_model_pooler_maps_to_the_pooler_and_two_poolers_are_refused():
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    flat = roberta_convert.convert(tensors)
    as_model = roberta_convert.convert(_masked_lm_style(tensors))
    assert sorted(as_model) == sorted(k for k in flat if not k.startswith("params/head/"))
    np.testing.assert_array_equal(as_model["params/roberta/pooler/kernel"], flat["params/roberta/pooler/kernel"])
    with pytest.raises(ConvertError) as e:
        roberta_convert.convert({**tensors, "roberta.pooler.dense.weight": tensors["classifier.dense.weight"]})
    assert "both" in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_without_pooler_loads_with_the_pooler_at_init(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    tensors = load_file(str(MODEL_DIR / "model.safetensors"))
    folder = tmp_path / "mlm"
    folder.mkdir()
    mlm = {k: v for k, v in _masked_lm_style(tensors).items() if "pooler" not in k}
    save_file({**mlm, "lm_head.bias": np.zeros(50, np.float32)}, str(folder / "model.safetensors"))
    hf = models.load_hf_config(MODEL_DIR)
    (folder / "config.json").write_text(json.dumps(hf))
    model = classification.build_classifier("roberta", hf, num_labels=2)
    fresh = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), *(jnp.ones((1, 4), jnp.int32),) * 3))
    out = train.load_pretrained_variables(common.base_config(), models.family("roberta"), folder, fresh)
    flat, init = tree.flatten(out["params"]), tree.flatten(fresh["params"])
    np.testing.assert_array_equal(flat["roberta/pooler/kernel"], init["roberta/pooler/kernel"])
    np.testing.assert_array_equal(flat["roberta/encoder/layer_1/output/kernel"],
                                  tensors["roberta.encoder.layer.1.output.dense.weight"].T)


# ---- methods --------------------------------------------------------------------------------------------

T = roberta.TINY_ROBERTA
H, L, I, V, P = T["hidden_size"], T["num_hidden_layers"], T["intermediate_size"], T["vocab_size"], \
    T["max_position_embeddings"]
HEAD = H * 2 + 2
EMBEDDINGS = (V + P + T["type_vocab_size"]) * H + 2 * H
LAYER = 4 * (H * H + H) + 2 * 2 * H + (H * I + I) + (I * H + H)
POOLER = H * H + H
TOTAL = EMBEDDINGS + L * LAYER + POOLER + HEAD
NORMS = L * 2 * 2 * H + 2 * H

# method, small method_args, the trainable count written out from the tiny config
METHOD_CASES = [
    ("full", {}, TOTAL),
    ("linear_probe", {}, HEAD),
    ("freeze", {"freeze_bottom_k": 1}, TOTAL - EMBEDDINGS - LAYER),
    ("gradual_unfreezing", {"unfreeze_every_steps": 1}, TOTAL),  # all of it, group by group
    ("bitfit", {}, L * (4 * H + H + I + H + H) + H + H + HEAD),  # q k v out, 2 LN, FFN; emb LN, pooler
    ("layernorm", {}, NORMS + HEAD),
    ("lora", {"lora_rank": 2}, L * 2 * (H * 2 + 2 * H) + HEAD),  # query and value
    ("ia3", {}, L * (H + H + I) + HEAD),
    ("adapter", {"adapter_size": 4}, L * 2 * (H * 4 + 4 + 4 * H + H) + NORMS + HEAD),
    ("prompt", {"prompt_tokens": 3}, 3 * H + HEAD),
    ("prefix", {"prefix_tokens": 2}, 2 * L * 2 * H + HEAD),
]
# Every method's additions at once, with the small sizes above: one init (XLA compiles are
# the cost here) from which each method's model takes its own parameters.
ALL_ADDITIONS = Peft(lora_rank=2, ia3=True, adapter="houlsby", adapter_size=4, prompt_tokens=3, prefix_tokens=2)


def _batch():
    ids = np.random.RandomState(0).randint(3, V, (4, 6)).astype(np.int32)
    ids[:, 0], ids[2:, 4:] = 0, PAD
    return {"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int32), "token_type_ids": np.zeros_like(ids),
            "label": np.array([0, 1, 1, 0], np.int32)}


def _build(peft):
    # no dropout: the test is about which parameters move, and dropout's RNG only slows the compile
    return classification.build_classifier("roberta", roberta.TINY_ROBERTA, num_labels=2, peft=peft, dropout=0.0,
                                           head_dropout=0.0)


@pytest.fixture(scope="module")
def all_params():
    b = _batch()
    variables = jax.jit(_build(ALL_ADDITIONS).init)(jax.random.key(0), b["input_ids"], b["attention_mask"],
                                                     b["token_type_ids"])
    return tree.flatten(jax.device_get(variables["params"]))


def test_every_method_is_covered():
    assert {m for m, _, _ in METHOD_CASES} == set(methods.METHODS)


@pytest.mark.parametrize("method,args,expected", METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_method_trains_exactly_what_it_says(method, args, expected, all_params):
    c = family_checks.method_config(method, **args)
    model, batch = _build(methods.peft(c)), _batch()
    shapes = tree.flatten(jax.eval_shape(lambda: model.init(
        jax.random.key(0), batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))["params"])
    assert all(all_params[k].shape == s.shape for k, s in shapes.items())
    params = tree.unflatten({k: jnp.asarray(all_params[k]) for k in shapes})
    opt = family_checks.method_optimizer(c, models.layout("roberta", roberta.TINY_ROBERTA), params)
    assert opt.trainable == expected
    # two updates: zero-initialised LoRA B / adapter "up" pass gradient to A / "down" from the second on
    state = family_checks.train_steps(model, opt, params, [batch, batch])
    # frozen leaves bitwise equal, trainable ones moved, Adam's two moments for the trainable leaves only
    moves = family_checks.assert_trains_exactly(method, opt, all_params, state.params, state.opt_state, 2)
    if opt.start_of:  # gradual unfreezing: after updates 0 and 1, the groups that started by update 1
        assert moves["head/kernel"] and moves["roberta/pooler/kernel"]
        assert not moves["roberta/encoder/layer_0/output/bias"]


# ---- end to end -----------------------------------------------------------------------------------------

def _write_roberta_tokenizer(folder: pathlib.Path) -> pathlib.Path:
    """A RoBERTa-style tokenizer.json (<s> 0, <pad> 1, </s> 2, <unk> 3) over the test words."""
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_train_evaluate_and_hf_export(tmp_path):
    files = family_checks.data_files(tmp_path, vocab=_write_roberta_tokenizer(tmp_path / "tok"))
    # 3 steps, one eval bucket (one eval compile); the HF folder converts back to the exported params
    run = family_checks.train_and_export(files, tmp_path, "roberta", 3, "RobertaForSequenceClassification")
    assert run.hf["model_type"] == "roberta"
    assert run.hf["pad_token_id"] == PAD and run.hf["id2label"] == {"0": "neg", "1": "pos"}
    assert (run.hf_dir / "tokenizer.json").is_file()
    written = load_file(str(run.hf_dir / "model.safetensors"))
    # the names of a RobertaForSequenceClassification checkpoint (the fixture is one)
    assert sorted(written) == sorted(load_file(str(MODEL_DIR / "model.safetensors")))
    with pytest.raises(UserError, match="pooling=pooler"):
        models.family("roberta").hf_export.check({"pooling": "mean"})
