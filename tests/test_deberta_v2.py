"""DeBERTa-v2/v3 in Flax against the reference implementation (HF transformers, PyTorch), and its plumbing.

Fixtures come from tests/fixtures/make_deberta_v2_fixtures.py (no torch is needed here):
a DeBERTa-v3-style tiny random classifier (log buckets, shared position keys, c2p + p2c,
rel LayerNorm, no absolute positions) and a v2-style one (absolute positions, token
types, separate position projections, raw clipped distances, tanh pooler).
"""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import common
from ftjax import convert, methods, models, train
from ftjax import tree as tree_lib
from ftjax.convert import deberta_v2 as conv
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError
from ftjax.models import deberta_v2
from ftjax.models.layers import padding_bias
from ftjax.tasks import classification
from tests import family_checks

FIXTURES = family_checks.FIXTURES
V3_DIR = FIXTURES / "deberta_v2_tiny_random"
V2_DIR = V3_DIR / "v2_style"
STYLES = {"v3": (V3_DIR, ""), "v2": (V2_DIR, "v2_")}
TINY = deberta_v2.TINY_DEBERTA_V2

ref = family_checks.reference_fixture("deberta_v2")


def _inputs(ref, prefix):
    return tuple(ref[prefix + k] for k in ("input_ids", "attention_mask", "token_type_ids"))


@functools.cache
def _reference_classifier(style):
    """Jitted (ids, mask, types) -> (sequence output, pooled, logits) of a fixture model.

    One compile per input shape gives the encoder's outputs and the classifier's logits.
    """
    folder, prefix = STYLES[style]
    num_labels = np.load(FIXTURES / "deberta_v2_tiny_random_outputs.npz")[prefix + "logits"].shape[-1]
    # the HF classifier head is converted too: nothing is excused
    model, params = family_checks.converted_classifier("deberta_v2", folder, num_labels)

    @jax.jit
    def run(ids, mask, types):
        logits, state = model.apply({"params": params}, ids, mask, types, mutable=["intermediates"],
                                    capture_intermediates=lambda m, _: isinstance(m, deberta_v2.DebertaV2Model))
        seq, pooled = state["intermediates"]["deberta_v2"]["__call__"][0]
        return seq, pooled, logits

    return run


@pytest.mark.parametrize("style", STYLES)
def test_tiny_random_matches_pytorch(style, ref):
    """Hidden states, the pooler's output and DebertaV2ForSequenceClassification's logits."""
    _, prefix = STYLES[style]
    ids, mask, types = _inputs(ref, prefix)
    seq, pooled, logits = _reference_classifier(style)(ids, mask, types)
    family_checks.assert_close_on_tokens(seq, ref[prefix + "last_hidden_state"], mask, 1e-4)
    np.testing.assert_allclose(pooled, ref[prefix + "pooler_output"], atol=1e-4)
    np.testing.assert_allclose(logits, ref[prefix + "logits"], atol=1e-4)


def test_padding_does_not_change_real_tokens(ref):
    family_checks.assert_padding_changes_nothing(_reference_classifier("v3"), _inputs(ref, ""))


@pytest.mark.parametrize("name", ["v3", "tiny_fixture", "tiny_variant"])
def test_log_buckets_equal_transformers(name, ref):
    buckets, max_position, reach = ref[f"buckets_{name}_args"]
    ours = deberta_v2.log_bucket(np.arange(-reach, reach + 1), int(buckets), int(max_position))
    np.testing.assert_array_equal(ours, ref[f"buckets_{name}"])
    table = deberta_v2.relative_positions(40, int(buckets), int(max_position))
    assert table[0, 39] == ours[reach - 39] and table[39, 0] == ours[reach + 39]


@pytest.mark.parametrize("style", STYLES)
def test_converter_round_trip(style):
    folder, _ = STYLES[style]
    tensors = load_file(str(folder / "model.safetensors"))
    flat = conv.convert(tensors)
    assert all(k.startswith(("params/deberta_v2/", "params/head/")) for k in flat)
    back = conv.to_hf({k[len("params/"):]: v for k, v in flat.items()})
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_unknown_tensor_is_one_convert_error(tmp_path):
    tensors = load_file(str(V3_DIR / "model.safetensors"))
    with pytest.raises(ConvertError, match="deberta.encoder.conv.conv.weight") as e:
        conv.convert({**tensors, "deberta.encoder.conv.conv.weight": np.zeros((32, 32, 3), np.float32)})
    assert "\n" not in str(e.value)
    shutil.copytree(V3_DIR, tmp_path / "m")
    save_file({**tensors, "deberta.encoder.layer.0.attention.self.mystery.weight": np.zeros(3, np.float32)},
              str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ConvertError, match="mystery") as e:
        convert.convert_folder(tmp_path / "m", family="deberta_v2")
    assert "\n" not in str(e.value)
    # known pretraining heads are skipped, not refused
    extra = {"lm_predictions.lm_head.bias": np.zeros(99, np.float32), "deberta.embeddings.position_ids":
             np.arange(64)[None], "mask_predictions.classifier.weight": np.zeros((1, 32), np.float32)}
    assert sorted(conv.convert({**tensors, **extra})) == sorted(conv.convert(tensors))


@pytest.mark.parametrize("change,match", [
    ({"pos_att_type": ["c2p", "p2p"]}, "'p2p'"),
    ({"pos_att_type": "p2c|c2p|p2p"}, "'p2p'"),
    ({"conv_kernel_size": 3}, "conv_kernel_size=3"),
    ({"hidden_size": 33}, "not divisible"),
    ({"embedding_size": 16}, "embedding_size=16"),
    ({"pooler_hidden_act": "mish"}, "pooler_hidden_act"),
    ({"position_buckets": 256, "max_position_embeddings": 100}, "position_buckets=256"),
])
def test_unsupported_configs_are_one_user_error(change, match):
    with pytest.raises(UserError, match=match) as e:
        deberta_v2.DebertaV2Config.from_hf({**TINY, **change})
    assert "\n" not in str(e.value)


def test_config_reads_hub_spellings():
    cfg = deberta_v2.DebertaV2Config.from_hf({**TINY, "pos_att_type": "P2C|c2p", "max_relative_positions": -1})
    assert cfg.pos_att_type == ("p2c", "c2p") and cfg.scale_factor == 3 and cfg.att_span == 8
    assert cfg.max_relative == 64 and cfg.rel_layer_norm
    base = deberta_v2.FAMILY.config(models.variant_config("deberta_v2", "base"))
    assert (base.hidden_size, base.num_hidden_layers, base.att_span) == (768, 12, 256)
    assert not base.position_biased_input and base.type_vocab_size == 0
    # HF's classifier dropout: cls_dropout, else hidden_dropout_prob
    heads = [classification.build_classifier("deberta_v2", {**TINY, **extra}, num_labels=2).head_dropout
             for extra in ({}, {"cls_dropout": 0.3})]
    assert heads == [TINY["hidden_dropout_prob"], 0.3]


def test_export_needs_the_pooler():
    deberta_v2.FAMILY.hf_export.check({"pooling": "pooler"})
    with pytest.raises(UserError, match="pooling=pooler") as e:
        deberta_v2.FAMILY.hf_export.check({"pooling": "mean"})
    assert "\n" not in str(e.value)


def test_pooler_less_checkpoint_with_unused_positions_loads(tmp_path, monkeypatch):
    """A masked-LM-style checkpoint: no pooler, no classifier, absolute positions it does not use."""
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    tensors = load_file(str(V3_DIR / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("pooler.", "classifier."))}
    tensors["deberta.embeddings.position_embeddings.weight"] = np.ones((64, 32), np.float32)
    shutil.copytree(V3_DIR, tmp_path / "m")
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    hf = models.load_hf_config(tmp_path / "m")
    model = classification.build_classifier("deberta_v2", hf, num_labels=2)
    fresh = {"params": family_checks.zeros_like_init(model)}
    config = common.base_config()
    out = train.load_pretrained_variables(config, deberta_v2.FAMILY, tmp_path / "m", fresh)
    flat, init = tree_lib.flatten(out["params"]), tree_lib.flatten(fresh["params"])
    np.testing.assert_array_equal(flat["deberta_v2/pooler/kernel"], init["deberta_v2/pooler/kernel"])
    np.testing.assert_array_equal(flat["deberta_v2/encoder/rel_embeddings/embedding"],
                                  tensors["deberta.encoder.rel_embeddings.weight"])


# --- methods --------------------------------------------------------------------------------------
H, F, L, V, R = 32, 64, 2, 128, 16  # the tiny variant: hidden, FFN, layers, vocab, rel-table rows
HEAD = H * 2 + 2
LAYER = 4 * (H * H + H) + 2 * 2 * H + H * F + F + F * H + H
NORMS = L * 2 * 2 * H + 2 * H + 2 * H  # the layers', the embeddings' and the rel table's LayerNorms
STEM = V * H + 2 * H + R * H + 2 * H  # embeddings + the shared rel table and its LayerNorm
TOTAL = STEM + L * LAYER + H * H + H + HEAD
ADAPTER = H * 4 + 4 + 4 * H + H

# (method, method_args, closed-form trainable count, how its training is checked)
# "step": jitted make_train_step steps on the model with the method's additions;
# "optimizer": the method only chooses among the base model's leaves, whose gradients the
#   "full" step shows are all non-zero: its optimizer runs on non-zero gradients (no model
#   compile); "count": a variant of a method checked above, closed-form count only.
METHOD_CASES = [
    ("full", {}, TOTAL, "step"),
    ("linear_probe", {}, HEAD, "optimizer"),
    ("freeze", {"freeze_bottom_k": 1}, TOTAL - STEM - LAYER, "optimizer"),
    ("gradual_unfreezing", {"unfreeze_every_steps": 1}, TOTAL, "optimizer"),
    ("bitfit", {}, L * (4 * H + H + F + H + H) + H + H + H + HEAD, "optimizer"),
    ("layernorm", {}, NORMS + HEAD, "optimizer"),
    ("lora", {"lora_rank": 2}, L * 2 * (H * 2 + 2 * H) + HEAD, "step"),
    ("ia3", {}, L * (H + H + F) + HEAD, "step"),
    ("adapter", {"adapter_size": 4}, L * 2 * ADAPTER + NORMS + HEAD, "step"),
    ("adapter", {"adapter_kind": "pfeiffer", "adapter_size": 4}, L * ADAPTER + NORMS + HEAD, "count"),
    ("prompt", {"prompt_tokens": 3, "prompt_init": "random"}, 3 * H + HEAD, "step"),
    ("prefix", {"prefix_tokens": 2}, 2 * L * 2 * H + HEAD, "step"),
    ("prefix", {"prefix_tokens": 2, "prefix_reparam": 8}, 2 * H + H * 8 + 8 + 8 * L * 2 * H + L * 2 * H + HEAD,
     "count"),
    ("full", {"layerwise_lr_decay": 0.5}, TOTAL, "count"),
]
CASE_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in a.items())}" for m, a, _, _ in METHOD_CASES]


def _batch(seed):
    rs = np.random.RandomState(seed)
    mask = np.ones((4, 7), np.int32)
    mask[1, 4:] = 0
    return {"input_ids": rs.randint(5, V, (4, 7)).astype(np.int32) * mask, "attention_mask": mask,
            "token_type_ids": np.zeros((4, 7), np.int32), "label": rs.randint(0, 2, (4,)).astype(np.int32)}


def _tiny_model(method, **args):
    """(the tiny classifier with the method's additions, random params) without compiling an init.

    Every leaf is random (LayerNorm scales and IA3 vectors around 1): LoRA's B and the
    adapters' up projections are not zero, so every trainable leaf gets a gradient at once.
    """
    config = family_checks.method_config(method, **args)
    model = classification.build_classifier("deberta_v2", TINY, num_labels=2, peft=methods.peft(config))
    b = _batch(0)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), b["input_ids"], b["attention_mask"],
                                               b["token_type_ids"]))["params"]
    rs = np.random.RandomState(0)

    def leaf(path, s):
        noise = (0.05 * rs.normal(size=s.shape)).astype(np.float32)
        return noise + 1 if path.endswith(("/scale",)) or "/ia3_" in path else noise

    return config, model, tree_lib.tree_map_with_path(leaf, shapes)


def test_every_registered_method_is_covered():
    assert {m for m, _, _, check in METHOD_CASES if check != "count"} == set(methods.METHODS)


@pytest.mark.parametrize("method,args,expected,check", METHOD_CASES, ids=CASE_IDS)
def test_methods_train_what_their_rules_say(method, args, expected, check):
    config, model, params = _tiny_model(method, **args)
    methods.check_family(config, deberta_v2.FAMILY)
    opt = family_checks.method_optimizer(config, models.layout("deberta_v2", TINY), params)
    assert opt.trainable == expected
    if method == "full":
        assert tree_lib.count_params(params) == TOTAL
    if check == "count":
        return
    if check == "step":
        state = family_checks.train_steps(model, opt, params, [_batch(s) for s in range(2)])
        new_params, opt_state = state.params, state.opt_state
    else:
        rs = np.random.RandomState(1)
        new_params, opt_state = family_checks.optimizer_steps(
            opt, params, lambda _: jax.tree.map(lambda p: rs.normal(size=p.shape).astype(np.float32), params), 2)
    # gradual unfreezing: after 2 updates, the head and the groups that start at update 1 have moved
    family_checks.assert_trains_exactly(method, opt, tree_lib.flatten(params), new_params, opt_state, 2)


def test_lora_and_ia3_merge_exactly_dropout_and_bf16():
    """share_att_key: the position table goes through the same query/key layers, so merges stay exact."""
    b = _batch(0)
    inputs = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
    _, base, _ = _tiny_model("full")
    run_base = jax.jit(lambda p: base.apply({"params": p}, *inputs))
    for method, args in (("lora", {"lora_rank": 2}), ("ia3", {})):
        _, model, params = _tiny_model(method, **args)
        out = jax.jit(lambda p, m=model: m.apply({"params": p}, *inputs))(params)
        plain = tree_lib.unflatten({k: v for k, v in tree_lib.flatten(params).items()
                                    if "/lora_" not in k and "/ia3_" not in k})
        assert not np.allclose(out, run_base(plain), atol=1e-4)  # the additions do something
        merged = methods.get(method).merge(params, model.peft)
        np.testing.assert_allclose(run_base(merged), out, atol=1e-5)
    # eval: deterministic (run_base above); train: dropout (hidden, attention and position table) on
    noisy = jax.jit(lambda p: base.apply({"params": p}, *inputs, train=True, rngs={"dropout": jax.random.key(1)}))
    assert not np.allclose(noisy(plain), run_base(plain), atol=1e-4)
    half = classification.build_classifier("deberta_v2", TINY, num_labels=2, dtype="bfloat16")
    out = jax.jit(lambda p: half.apply({"params": p}, *inputs))(plain)
    assert out.dtype == jnp.float32 and np.allclose(out, run_base(plain), atol=5e-2)


def test_relative_positions_are_shift_invariant():
    """Prompt tokens sit before [CLS] as sequence positions: the real tokens' mutual distances,
    and so their outputs when the extra positions are masked out, are as without them."""
    cfg = deberta_v2.FAMILY.config(TINY)
    enc = deberta_v2.Encoder(cfg, 0.0, 0.0)
    rs = np.random.RandomState(0)
    x = rs.normal(size=(2, 9, H)).astype(np.float32)
    extra = rs.normal(size=(2, 4, H)).astype(np.float32)
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), x, padding_bias(np.ones((2, 9))), train=False))
    variables = jax.tree.map(lambda s: (0.1 * rs.normal(size=s.shape)).astype(np.float32), shapes)
    run = jax.jit(lambda h, m: enc.apply(variables, h, padding_bias(m), train=False))
    ones, zeros = np.ones((2, 9), np.int32), np.zeros((2, 4), np.int32)
    after = run(np.concatenate([x, extra], 1), np.concatenate([ones, zeros], 1))[:, :9]  # extra after: unseen
    before = run(np.concatenate([extra, x], 1), np.concatenate([zeros, ones], 1))[:, 4:]  # extra first
    np.testing.assert_allclose(before, after, atol=1e-5)
    seen = run(np.concatenate([extra, x], 1), np.concatenate([zeros + 1, ones], 1))[:, 4:]
    assert not np.allclose(seen, after, atol=1e-3)


# --- end to end -----------------------------------------------------------------------------------
files = family_checks.files_fixture()


def test_train_evaluate_and_hf_export_of_the_tiny_variant(files, tmp_path):
    # the HF folder converts back to the exported params exactly
    family_checks.train_and_export(files, tmp_path, "deberta_v2", 3, "DebertaV2ForSequenceClassification")
