"""MPNet in Flax against the reference implementation (HF transformers, PyTorch), methods, training, export.

Fixtures come from tests/fixtures/make_mpnet_fixtures.py; no torch is needed here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import convert, methods, models, tree
from ftjax.convert import mpnet as mpnet_convert
from ftjax.convert.safetensors_io import ConvertError, read_safetensors_folder
from ftjax.errors import UserError
from ftjax.models import mpnet
from ftjax.tasks import classification
from tests import family_checks
from tests.conftest import require_asset
from tests.family_checks import assert_close_on_tokens

FIXTURES = family_checks.FIXTURES
TINY_DIR = FIXTURES / "mpnet_tiny_random"

ref = family_checks.reference_fixture("mpnet")


def _encoder():
    """(input_ids, attention_mask) -> (sequence, pooled) of the tiny random fixture, jitted."""
    return family_checks.encoder_fn("mpnet", TINY_DIR)


def test_tiny_random_matches_pytorch(ref):
    seq, pooled = _encoder()(ref["input_ids"], ref["attention_mask"])
    assert_close_on_tokens(seq, ref["last_hidden_state"], ref["attention_mask"], 1e-4)
    np.testing.assert_allclose(pooled, ref["pooled"], atol=1e-4)  # tanh(classifier.dense(<s>))


def test_tiny_random_classifier_logits_match_pytorch(ref):
    # strict: the HF classifier converts with nothing missing or extra
    model, params = family_checks.converted_classifier("mpnet", TINY_DIR)
    logits = jax.jit(model.apply)({"params": params}, ref["input_ids"], ref["attention_mask"], None)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_padding_does_not_change_real_tokens(ref):
    _, (b, pb), (ids, mask) = family_checks.assert_padding_changes_nothing(
        _encoder(), (ref["input_ids"], ref["attention_mask"]), pad_id=mpnet.PADDING_IDX)
    # masked filler that is not <pad> (a pipeline padding with another id) changes nothing either
    c, pc = _encoder()(np.where(mask > 0, ids, 4), mask)
    assert_close_on_tokens(c, b, mask, 1e-5)
    np.testing.assert_allclose(pc, pb, atol=1e-5)


def test_relative_buckets_and_positions_match_the_reference(ref):
    span = (len(ref["bucket_distance"]) - 1) // 2
    # the reference's distance is key - query: one query in the middle of 2 * span + 1 keys
    ours = mpnet.relative_position_buckets(2 * span + 1, 2 * span + 1)[span]
    np.testing.assert_array_equal(ours, ref["buckets"])
    # every bucket is reached (both directions, exact, log-spaced, the far cap) but 16: a
    # distance of 0 always falls in the lower half
    assert set(ours.tolist()) == set(range(32)) - {16}
    ids = jnp.array([[0, 7, 9, 2, 1, 1]])
    np.testing.assert_array_equal(mpnet.position_ids(ids), [[2, 3, 4, 5, 1, 1]])


def test_converter_maps_every_name_and_round_trips():
    tensors = read_safetensors_folder(TINY_DIR)
    flat = mpnet_convert.convert(tensors)
    assert "params/mpnet/relative_attention_bias/embedding" in flat
    assert flat["params/mpnet/pooler/kernel"].shape == (32, 32)
    back = mpnet_convert.to_hf({k[len("params/"):]: v for k, v in flat.items()})
    assert set(back) == set(tensors)  # MPNetForSequenceClassification's own names
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    # MPNetModel names (no prefix) with a pooler, and the skipped buffers / LM head
    bare = {name[len("mpnet."):]: v for name, v in tensors.items() if name.startswith("mpnet.")}
    bare["pooler.dense.weight"] = tensors["classifier.dense.weight"]
    bare["pooler.dense.bias"] = tensors["classifier.dense.bias"]
    bare["embeddings.position_ids"] = np.arange(40)[None]
    bare["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
    flat2 = mpnet_convert.convert(bare)
    assert set(flat2) == {k for k in flat if not k.startswith("params/head/")}
    np.testing.assert_array_equal(flat2["params/mpnet/pooler/kernel"], flat["params/mpnet/pooler/kernel"])
    # a masked-LM checkpoint (no pooler) fits once the family's `optional` excuses the pooler
    del bare["pooler.dense.weight"], bare["pooler.dense.bias"]
    model = classification.build_classifier("mpnet", models.load_hf_config(TINY_DIR), num_labels=3)
    init = family_checks.zeros_like_init(model)
    loaded = tree.unflatten({k[len("params/"):]: v for k, v in mpnet_convert.convert(bare).items()})
    with pytest.raises(tree.MergeError, match="mpnet/pooler/kernel"):
        tree.merge(loaded, init, dont_load=(r"head/.*",))
    tree.merge(loaded, init, dont_load=(r"head/.*",) + mpnet.FAMILY.optional)


def test_converter_errors_are_one_line():
    tensors = read_safetensors_folder(TINY_DIR)
    with pytest.raises(ConvertError, match=r"unknown tensor 'encoder.layer.0.attention.attn.rel.weight'") as e:
        mpnet_convert.convert({**tensors, "mpnet.encoder.layer.0.attention.attn.rel.weight": np.zeros(2)})
    assert "\n" not in str(e.value)
    with pytest.raises(ConvertError, match="both pooler.dense and classifier.dense") as e:
        mpnet_convert.convert({**tensors, "mpnet.pooler.dense.weight": tensors["classifier.dense.weight"]})
    assert "\n" not in str(e.value)
    with pytest.raises(ConvertError, match="lora_a"):
        mpnet_convert.to_hf({"mpnet/encoder/layer_0/attention/query/lora_a": np.zeros((32, 2))})


def test_bad_configs_and_inputs_give_one_line():
    hf = dict(mpnet.TINY_MPNET)
    with pytest.raises(UserError, match="relative_attention_num_buckets=16"):
        mpnet.MPNetConfig.from_hf({**hf, "relative_attention_num_buckets": 16})
    with pytest.raises(UserError, match="not divisible"):
        mpnet.MPNetConfig.from_hf({**hf, "num_attention_heads": 5})
    with pytest.raises(UserError, match="hidden_act='gelu_x'"):
        mpnet.MPNetConfig.from_hf({**hf, "hidden_act": "gelu_x"})
    model = mpnet.MPNetModel(mpnet.MPNetConfig.from_hf(hf))
    too_long = jnp.ones((1, hf["max_position_embeddings"] - 1), jnp.int32)
    with pytest.raises(UserError, match="max_length of at most 64"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), too_long, too_long))
    with pytest.raises(UserError, match="pools with 'mean'"):
        mpnet.FAMILY.hf_export.check({"pooling": "mean"})
    mpnet.FAMILY.hf_export.check({"pooling": "pooler"})


# ---- methods: what trains, closed-form counts on the tiny variant ----------------------

H, I, N, V, P, B = 32, 64, 2, 64, 66, 32  # hidden, intermediate, layers, vocab, positions, buckets
HEAD = H * 2 + 2
EMBED = V * H + P * H + 2 * H
RELATIVE = B * 2  # buckets x heads
LAYER = 4 * (H * H + H) + 2 * 2 * H + H * I + I + I * H + H
TOTAL = EMBED + RELATIVE + N * LAYER + H * H + H + HEAD
NORMS = N * 2 * 2 * H + 2 * H
LORA = N * 2 * (H * 2 + 2 * H)  # rank 2 on query and value
IA3 = N * (H + H + I)
HOULSBY = N * 2 * (H * 4 + 4 + 4 * H + H)  # size 4, after attention and FFN
PFEIFFER = N * (H * 4 + 4 + 4 * H + H)
PREFIX = 3 * N * 2 * H
PREFIX_MLP = 2 * H + H * 8 + 8 + 8 * N * 2 * H + N * 2 * H  # 2 tokens, reparam width 8
# (method, method_args, trainable params, params the method adds)
METHOD_CASES = [
    ("full", {}, TOTAL, 0),
    ("full", {"layerwise_lr_decay": 0.5}, TOTAL, 0),
    ("linear_probe", {}, HEAD, 0),
    ("freeze", {"freeze_bottom_k": 1}, TOTAL - EMBED - RELATIVE - LAYER, 0),
    ("gradual_unfreezing", {"unfreeze_every_steps": 1}, TOTAL, 0),
    ("bitfit", {}, N * (4 * H + H + I + H + H) + H + H + HEAD, 0),
    ("layernorm", {}, NORMS + HEAD, 0),
    ("lora", {"lora_rank": 2}, LORA + HEAD, LORA),
    ("ia3", {}, IA3 + HEAD, IA3),
    ("adapter", {"adapter_size": 4}, HOULSBY + NORMS + HEAD, HOULSBY),
    ("adapter", {"adapter_kind": "pfeiffer", "adapter_size": 4}, PFEIFFER + NORMS + HEAD, PFEIFFER),
    ("prompt", {"prompt_tokens": 3}, 3 * H + HEAD, 3 * H),
    ("prefix", {"prefix_tokens": 3}, PREFIX + HEAD, PREFIX),
    ("prefix", {"prefix_tokens": 2, "prefix_reparam": 8}, PREFIX_MLP + HEAD, PREFIX_MLP),
]


def _batch(seed):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, (4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": np.where(mask > 0, ids, mpnet.PADDING_IDX), "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids), "label": rs.randint(0, 2, (4,)).astype(np.int32)}


def _model(method, args):
    c = family_checks.method_config(method, **args)
    hf = models.variant_config("mpnet", "tiny")
    return c, models.layout("mpnet", hf), classification.build_classifier("mpnet", hf, num_labels=2,
                                                                          peft=methods.peft(c))


def _init(model, shapes_only=False):
    b = _batch(0)
    init = lambda: model.init(jax.random.key(0), b["input_ids"], b["attention_mask"], b["token_type_ids"])
    return (jax.eval_shape(init) if shapes_only else init())["params"]


@pytest.mark.parametrize("method,args,trainable,added", METHOD_CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in a.items())}" for m, a, _, _ in METHOD_CASES])
def test_trainable_counts_match_the_closed_form(method, args, trainable, added):
    counts = family_checks.trainable_counts("mpnet", models.variant_config("mpnet", "tiny"),
                                            family_checks.method_config(method, **args))
    assert counts == (trainable, TOTAL + added)


def test_layerwise_lr_decay_puts_the_relative_bias_at_the_bottom():
    c, layout, model = _model("full", {"layerwise_lr_decay": 0.5})
    _, lr_rules = methods.rules(c, layout)
    mults = tree.flatten(tree.tree_from_rules(_init(model, shapes_only=True), lr_rules))
    assert mults["head/kernel"] == 1.0 and mults["mpnet/pooler/kernel"] == 1.0
    assert mults["mpnet/encoder/layer_1/attention/query/kernel"] == 0.5
    assert mults["mpnet/encoder/layer_0/output/bias"] == 0.25
    assert mults["mpnet/embeddings/word_embeddings/embedding"] == 0.125
    assert mults["mpnet/relative_attention_bias/embedding"] == 0.125  # shared by all layers: with the stem


# Methods that only choose what trains (no model change): the exact set of trainable
# paths is checked here without compiling; the optimizer's freezing itself is
# family-independent (tests/test_methods.py), and "full" below shows every MPNet
# parameter gets a gradient through a real step.
RULE_ONLY = {
    "linear_probe": ({}, lambda p: p.startswith("head/")),
    "freeze": ({"freeze_bottom_k": 1},
               lambda p: not p.startswith(("mpnet/embeddings/", "mpnet/relative_attention_bias/",
                                           "mpnet/encoder/layer_0/"))),
    "bitfit": ({}, lambda p: p.startswith("head/") or p.endswith("/bias")),
    "layernorm": ({}, lambda p: p.startswith("head/") or "LayerNorm/" in p),
    "gradual_unfreezing": ({"unfreeze_every_steps": 1}, lambda p: True),
}
# the step at which gradual unfreezing starts each group (every step: a group per step)
UNFREEZE_AT = {"head/": 0, "mpnet/pooler/": 1, "mpnet/encoder/layer_1/": 1, "mpnet/encoder/layer_0/": 2,
               "mpnet/embeddings/": 3, "mpnet/relative_attention_bias/": 3}


@pytest.mark.parametrize("method", sorted(RULE_ONLY))
def test_rule_only_methods_select_exactly_their_parameters(method):
    args, trains = RULE_ONLY[method]
    c, layout, model = _model(method, args)
    shapes = _init(model, shapes_only=True)
    trainable_rules, _ = methods.rules(c, layout)
    flags = tree.flatten(tree.tree_from_rules(shapes, trainable_rules))
    assert {p for p, t in flags.items() if t} == {p for p in flags if trains(p)}
    starts = methods.start_rules(c, layout, steps_per_epoch=10)
    if method == "gradual_unfreezing":
        start_of = tree.flatten(tree.tree_from_rules(shapes, starts))
        assert start_of == {p: next(s for g, s in UNFREEZE_AT.items() if p.startswith(g)) for p in flags}
    else:
        assert starts is None


# full, and every method that changes the model: a train-step compile each
TRAIN_CASES = [("full", {}), ("lora", {"lora_rank": 2}), ("ia3", {}), ("adapter", {"adapter_size": 4}),
               ("prompt", {"prompt_tokens": 3}), ("prefix", {"prefix_tokens": 3})]


def test_every_method_is_covered():
    tested = {m for m, _ in TRAIN_CASES} | set(RULE_ONLY)
    assert tested == {c[0] for c in METHOD_CASES} == set(methods.METHODS)


@pytest.mark.parametrize("method,args", TRAIN_CASES, ids=[m for m, _ in TRAIN_CASES])
def test_method_trains_exactly_its_rules(method, args):
    c, layout, model = _model(method, args)
    params = _init(model)
    opt = family_checks.method_optimizer(c, layout, params)
    before = {k: np.asarray(v).copy() for k, v in tree.flatten(params).items()}
    # LoRA's A and an adapter's down projection move from the second step
    state = family_checks.train_steps(model, opt, params, [_batch(s) for s in range(3)])
    # frozen: bitwise equal; trainable: moved; Adam moments for the trainable leaves only
    family_checks.assert_trains_exactly(method, opt, before, state.params, state.opt_state, 3)


# ---- end to end: train on CSV data, export to HF layout, read the export back ---------------

files = family_checks.files_fixture()


def test_train_export_and_reload(files, tmp_path):
    # the HF folder converts back to exactly the params ftjax exported
    run = family_checks.train_and_export(files, tmp_path, "mpnet", 3, "MPNetForSequenceClassification")
    assert run.hf["model_type"] == "mpnet"
    assert mpnet.MPNetConfig.from_hf(run.hf) == mpnet.MPNetConfig.from_hf(mpnet.TINY_MPNET)


# ---- the real model: all-mpnet-base-v2's sentence embeddings ------------------------------

@pytest.mark.assets
def test_all_mpnet_base_v2_sentence_embeddings():
    """Mean-pooled, L2-normalised embeddings (the model's own modules) = sentence-transformers'."""
    from ftjax.data.tokenizer import load_tokenizer

    folder = require_asset("mpnet_base")
    ref = dict(np.load(FIXTURES / "mpnet_base_sentences.npz"))
    enc = load_tokenizer(folder).encode([str(s) for s in ref["sentences"]], None, 128)
    length = max(len(i) for i, _ in enc)
    ids = np.full((len(enc), length), mpnet.PADDING_IDX, np.int32)
    mask = np.zeros_like(ids)
    for r, (i, _) in enumerate(enc):
        ids[r, :len(i)], mask[r, :len(i)] = i, 1
    np.testing.assert_array_equal(ids, ref["input_ids"])  # our tokenizer setup = sentence-transformers'
    cfg = mpnet.MPNetConfig.from_hf(models.load_hf_config(folder))
    params = convert.load_pretrained(folder, "mpnet")["mpnet"]
    seq, _ = jax.jit(lambda p, i, m: mpnet.MPNetModel(cfg).apply({"params": p}, i, m))(params, ids, mask)
    emb = (np.asarray(seq) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    cosines = (emb * ref["embeddings"]).sum(-1)
    assert cosines.min() >= 0.9999, cosines
    assert emb[0] @ emb[1] > emb[0] @ emb[3] > emb[0] @ emb[2]  # paraphrase > related > unrelated
