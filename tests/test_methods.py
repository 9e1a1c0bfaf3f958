"""Fine-tuning methods: what trains, what stays bitwise frozen, closed-form counts, LoRA merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import checkpoint as ckpt_lib
from ftjax import methods, optim
from ftjax import step as step_lib
from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.models import bert
from tests import family_checks
from tests.family_checks import TASK2

MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2}

_config = family_checks.method_config


def _shapes(hf, config, num_labels=2):
    """(the BERT classifier with the method's additions, its param shapes)."""
    return family_checks.abstract_classifier("bert", hf, config, num_labels)


def _trainable(hf, config):
    """(trainable, all) params; the rules take the layer count as the layout."""
    return family_checks.trainable_counts("bert", hf, config, layout=hf["num_hidden_layers"])


HEAD = 384 * 2 + 2


@pytest.mark.parametrize("method,args,expected", [
    ("lora", {}, 6 * 2 * (384 * 8 + 8 * 384) + HEAD),  # r=8 on query and value
    ("linear_probe", {}, HEAD),
    ("bitfit", {}, 6 * (4 * 384 + 384 + 1536 + 384 + 384) + 384 + 384 + HEAD),
    ("layernorm", {}, 6 * 2 * 2 * 384 + 2 * 384 + HEAD),
    ("ia3", {}, 6 * (384 + 384 + 1536) + HEAD),
    ("adapter", {}, 6 * 2 * (384 * 64 + 64 + 64 * 384 + 384) + 6 * 2 * 2 * 384 + 2 * 384 + HEAD),
    ("adapter", {"adapter_kind": "pfeiffer"}, 6 * (384 * 64 + 64 + 64 * 384 + 384) + 6 * 2 * 2 * 384
     + 2 * 384 + HEAD),
    ("prompt", {}, 20 * 384 + HEAD),
    ("prefix", {}, 10 * 6 * 2 * 384 + HEAD),
    ("prefix", {"prefix_reparam": 32}, 10 * 384 + 384 * 32 + 32 + 32 * 6 * 2 * 384 + 6 * 2 * 384 + HEAD),
])
def test_trainable_counts_match_the_closed_form_on_minilm(method, args, expected):
    n_train, _ = _trainable(MINILM, _config(method, **args))
    assert n_train == expected


def test_freeze_bottom_k_and_full():
    full, total = _trainable(MINILM, _config("full"))
    assert full == total
    frozen, _ = _trainable(MINILM, _config("freeze", freeze_bottom_k=2))
    embeddings = (30522 + 512 + 2) * 384 + 2 * 384
    layer = 4 * (384 * 384 + 384) + 2 * 2 * 384 + 384 * 1536 + 1536 + 1536 * 384 + 384
    assert frozen == total - embeddings - 2 * layer
    with pytest.raises(UserError, match="freeze_bottom_k=7"):
        _trainable(MINILM, _config("freeze", freeze_bottom_k=7))
    with pytest.raises(UserError, match="unknown config.method 'lorax'"):
        methods.get("lorax")


def test_layerwise_lr_decay_multipliers():
    c = _config("full", layerwise_lr_decay=0.5)
    _, lr_rules = methods.rules(c, 2)
    _, shapes = _shapes(bert.TINY_BERT, c)
    mults = tree_lib.flatten(tree_lib.tree_from_rules(shapes, lr_rules))
    assert mults["head/kernel"] == 1.0 and mults["bert/pooler/kernel"] == 1.0
    assert mults["bert/encoder/layer_1/attention/query/kernel"] == 0.5
    assert mults["bert/encoder/layer_0/output/bias"] == 0.25
    assert mults["bert/embeddings/word_embeddings/embedding"] == 0.125


def _batch(n=8, length=6, seed=0):
    rs = np.random.RandomState(seed)
    return {"input_ids": rs.randint(5, 128, (n, length)).astype(np.int32),
            "attention_mask": np.ones((n, length), np.int32),
            "token_type_ids": np.zeros((n, length), np.int32),
            "label": rs.randint(0, 2, (n,)).astype(np.int32)}


@pytest.fixture(scope="module")
def mesh():
    return step_lib.make_mesh()


@pytest.mark.parametrize("method,args", [
    ("linear_probe", {}), ("freeze", {"freeze_bottom_k": 1}), ("bitfit", {}), ("layernorm", {}),
    ("lora", {"lora_rank": 4}), ("full", {"layerwise_lr_decay": 0.8}), ("ia3", {}),
    ("adapter", {"adapter_size": 4}), ("adapter", {"adapter_kind": "pfeiffer", "adapter_size": 4}),
    ("prompt", {"prompt_tokens": 3}), ("prefix", {"prefix_tokens": 3}),
    ("prefix", {"prefix_tokens": 2, "prefix_reparam": 8}),
])
def test_frozen_leaves_stay_bitwise_and_hold_no_moments(method, args, mesh, tmp_path):
    c = _config(method, **args)
    model, _ = _shapes(bert.TINY_BERT, c)
    b = _batch()
    params = model.init(jax.random.key(0), b["input_ids"], b["attention_mask"], b["token_type_ids"])["params"]
    trainable_rules, lr_rules = methods.rules(c, 2)
    tx, _ = optim.make_optimizer(c, params, 10, trainable_rules, lr_rules)
    mask = tree_lib.tree_from_rules(params, trainable_rules)
    before = {k: np.asarray(v).copy() for k, v in tree_lib.flatten(params).items()}  # params get donated
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
    rep = step_lib.replicated(mesh)
    state = jax.device_put(state, rep)
    fn = step_lib.jit_train_step(step_lib.make_train_step(model, tx, TASK2, trainable=mask), mesh,
                                 jax.tree.map(lambda _: rep, state))
    for s in range(3):
        state, _ = fn(state, step_lib.shard_batch(_batch(seed=s), mesh))
    after, flags = tree_lib.flatten(state.params), tree_lib.flatten(mask)
    assert (any(flags.values()) and not all(flags.values())) or method == "full"
    for path, trains in flags.items():
        unchanged = np.array_equal(before[path], np.asarray(after[path]))
        assert unchanged != trains, path  # frozen: bitwise equal; trainable: moved
    n_train = sum(np.size(before[p]) for p, t in flags.items() if t)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "ndim") and x.ndim > 0)
    assert moments == 2 * n_train  # Adam's mu and nu, for trainable leaves only
    # and the state survives a checkpoint round trip
    ck = ckpt_lib.Checkpointer(tmp_path, keep=1, keep_best=0, metric="accuracy", mode="max",
                               fingerprint={"method": method})
    ck.save(3, state, extra={}, force=True)
    ck.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    restored, _ = ck.restore(abstract)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_starts_as_the_base_model_and_merges_exactly():
    c = _config("lora", lora_rank=4, lora_alpha=8.0)
    lora_model, _ = _shapes(bert.TINY_BERT, c)
    base_model, _ = _shapes(bert.TINY_BERT, _config("full"))
    b = _batch()
    inputs = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
    params = lora_model.init(jax.random.key(0), *inputs)["params"]
    flat = tree_lib.flatten(params)
    assert sorted(p for p in flat if "lora" in p) == sorted(
        f"bert/encoder/layer_{i}/attention/{m}/lora_{ab}" for i in (0, 1) for m in ("query", "value")
        for ab in "ab")
    base = tree_lib.unflatten({k: v for k, v in flat.items() if "lora" not in k})
    np.testing.assert_array_equal(lora_model.apply({"params": params}, *inputs),
                                  base_model.apply({"params": base}, *inputs))
    # give B real values, then merging must keep the logits
    rs = np.random.RandomState(0)
    flat = {k: (rs.normal(size=v.shape).astype(np.float32) * 0.1 if k.endswith("lora_b") else v)
            for k, v in flat.items()}
    tuned = tree_lib.unflatten(flat)
    merged = methods.lora.merge(tuned, lora_model.peft)
    out_lora = lora_model.apply({"params": tuned}, *inputs)
    out_merged = base_model.apply({"params": merged}, *inputs)
    assert not np.allclose(out_lora, base_model.apply({"params": base}, *inputs), atol=1e-4)
    np.testing.assert_allclose(out_merged, out_lora, atol=1e-5)


def _inputs():
    b = _batch()
    return b["input_ids"], b["attention_mask"], b["token_type_ids"]


@pytest.mark.parametrize("method,args", [("ia3", {}), ("adapter", {"adapter_size": 4}),
                                         ("lora", {"lora_rank": 2})])
def test_methods_start_as_the_base_model(method, args):
    model, _ = _shapes(bert.TINY_BERT, _config(method, **args))
    base_model, _ = _shapes(bert.TINY_BERT, _config("full"))
    params = model.init(jax.random.key(0), *_inputs())["params"]
    added = ("lora_", "ia3_", "_adapter/")
    base = tree_lib.unflatten({k: v for k, v in tree_lib.flatten(params).items()
                               if not any(a in k for a in added)})
    np.testing.assert_allclose(model.apply({"params": params}, *_inputs()),
                               base_model.apply({"params": base}, *_inputs()), atol=1e-6)


def test_ia3_merges_exactly():
    model, _ = _shapes(bert.TINY_BERT, _config("ia3"))
    base_model, _ = _shapes(bert.TINY_BERT, _config("full"))
    params = model.init(jax.random.key(0), *_inputs())["params"]
    rs = np.random.RandomState(1)
    tuned = tree_lib.unflatten({k: (1 + 0.3 * rs.normal(size=v.shape)).astype(np.float32) if "ia3_" in k else v
                                for k, v in tree_lib.flatten(params).items()})
    np.testing.assert_allclose(base_model.apply({"params": methods.ia3.merge(tuned, model.peft)}, *_inputs()),
                               model.apply({"params": tuned}, *_inputs()), atol=1e-5)


def test_prompt_and_prefix_change_the_output_and_keep_shapes():
    for method, args in (("prompt", {"prompt_tokens": 3}), ("prefix", {"prefix_tokens": 3})):
        model, _ = _shapes(bert.TINY_BERT, _config(method, **args))
        params = model.init(jax.random.key(0), *_inputs())["params"]
        out = model.apply({"params": params}, *_inputs())
        assert out.shape == (8, 2)


def test_prompt_starts_from_vocabulary_embeddings():
    c = _config("prompt", prompt_tokens=4)
    model, _ = _shapes(bert.TINY_BERT, c)
    params = model.init(jax.random.key(0), *_inputs())["params"]
    out = methods.post_load(c, jax.device_get(params), tokenizer=None)
    words = np.asarray(out["bert"]["embeddings"]["word_embeddings"]["embedding"])
    for row in np.asarray(out["bert"]["prompt"]):
        assert any(np.array_equal(row, w) for w in words[64:])


def test_gradual_unfreezing_releases_one_group_at_a_time(mesh):
    c = _config("gradual_unfreezing", unfreeze_every_steps=2)
    model, _ = _shapes(bert.TINY_BERT, c)
    params = model.init(jax.random.key(0), *_inputs())["params"]
    before = {k: np.asarray(v).copy() for k, v in tree_lib.flatten(params).items()}
    trainable_rules, lr_rules = methods.rules(c, 2)
    starts = methods.start_rules(c, 2, steps_per_epoch=10)
    tx, _ = optim.make_optimizer(c, params, 10, trainable_rules, lr_rules, starts)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
    rep = step_lib.replicated(mesh)
    state = jax.device_put(state, rep)
    fn = step_lib.jit_train_step(step_lib.make_train_step(model, tx, TASK2), mesh,
                                 jax.tree.map(lambda _: rep, state))

    def moved(prefix):
        now = tree_lib.flatten(state.params)
        return [not np.array_equal(before[k], np.asarray(now[k])) for k in before if k.startswith(prefix)]

    for s in range(3):  # updates 0, 1, 2: the head from 0, pooler + top layer from 2
        state, _ = fn(state, step_lib.shard_batch(_batch(seed=s), mesh))
    assert all(moved("head/")) and all(moved("bert/pooler/")) and all(moved("bert/encoder/layer_1/"))
    assert not any(moved("bert/encoder/layer_0/")) and not any(moved("bert/embeddings/"))
    for s in range(3, 5):  # update 4: layer_0 joins; the embeddings wait for update 6
        state, _ = fn(state, step_lib.shard_batch(_batch(seed=s), mesh))
    assert all(moved("bert/encoder/layer_0/")) and not any(moved("bert/embeddings/"))
    with pytest.raises(UserError, match="exactly one of"):
        methods.start_rules(_config("gradual_unfreezing"), 2, 10)
