"""Rule-driven optimizer: freezing, weight-decay masks, lr multipliers, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from ftjax import optim
from ftjax.errors import UserError


def _params():
    return {
        "bert": {"layer_0": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
                             "attention_LayerNorm": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))}},
                 "layer_1": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}}},
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))},
    }


def _config(**opt):
    c = common.base_config()
    c.schedule.warmup_steps = 0
    c.schedule.decay = "constant"
    c.optimizer.grad_clip_norm = 0.0
    for k, v in opt.items():
        c.optimizer[k] = v
    return c


def _run(config, params, grads, steps=3):
    tx, _ = optim.make_optimizer(config, params, total_steps=10)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_frozen_leaves_stay_bitwise_and_hold_no_moments():
    params = _params()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    config = _config(trainable=((r"head/.*", True), (r".*", False)), lr=0.1)
    new, state = _run(config, params, grads)
    for path in ("bert/layer_0/query/kernel", "bert/layer_1/query/bias"):
        a, b = params, new
        for k in path.split("/"):
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(new["head"]["kernel"]), np.asarray(params["head"]["kernel"]))
    moment_sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size") and x.ndim > 0)
    head_size = 4 * 2 + 2
    assert moment_sizes == 2 * head_size  # Adam mu and nu for the head only


def test_weight_decay_spares_biases_and_layernorm():
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = _run(_config(lr=0.1, weight_decay=0.5, name="adamw"), params, zeros, steps=1)
    # zero gradients: only decay moves weights, and only kernels/embeddings decay.
    assert float(new["head"]["kernel"][0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)
    np.testing.assert_array_equal(new["bert"]["layer_0"]["query"]["bias"], params["bert"]["layer_0"]["query"]["bias"])
    np.testing.assert_array_equal(new["bert"]["layer_0"]["attention_LayerNorm"]["scale"],
                                  params["bert"]["layer_0"]["attention_LayerNorm"]["scale"])


def test_lr_multipliers_scale_updates():
    params = _params()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    config = _config(name="sgd", momentum=0.0, weight_decay=0.0, lr=0.1,
                     lr_rules=((r".*layer_0.*", 0.5), (r".*", 1.0)))
    new, _ = _run(config, params, grads, steps=1)
    d0 = 1.0 - float(new["bert"]["layer_0"]["query"]["kernel"][0, 0])
    d1 = 1.0 - float(new["bert"]["layer_1"]["query"]["kernel"][0, 0])
    assert d1 == pytest.approx(0.05)
    assert d0 == pytest.approx(0.025)


def test_uncovered_parameter_is_a_user_error():
    with pytest.raises(UserError, match="matches none of the rules"):
        optim.make_optimizer(_config(trainable=((r"bert/.*", True),)), _params(), 10)


def test_warmup_then_linear_decay():
    c = common.base_config()
    c.optimizer.lr = 1.0
    c.schedule.warmup_fraction = 0.1
    sched = optim.make_schedule(c, 100)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(55)) == pytest.approx(0.5)
    assert float(sched(100)) == pytest.approx(0.0)
    c.schedule.decay = "cosine"
    assert float(optim.make_schedule(c, 100)(55)) == pytest.approx(0.5, abs=1e-6)


def test_clipping_counts_only_trainable_gradients():
    params = _params()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 100.0), params)
    grads["head"] = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params["head"])
    c = _config(name="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, grad_clip_norm=10.0,
                trainable=((r"head/.*", True), (r".*", False)))
    new, _ = _run(c, params, grads, steps=1)
    # head grad norm = 0.1*sqrt(10) < 10: unclipped, although frozen grads are huge.
    assert float(params["head"]["kernel"][0, 0] - new["head"]["kernel"][0, 0]) == pytest.approx(0.1)


def test_rule_table_reports_trainable_share():
    text = optim.format_rule_table(_params(), ((r"head/.*", True), (r".*", False)))
    assert "trainable 10 of 58 parameters (17.24%)" in text
