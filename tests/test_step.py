"""The pure train step over a mesh: 1 vs 8 devices, gradient accumulation, eval."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from ftjax import optim
from ftjax import step as step_lib
from ftjax.models import layers
from ftjax.tasks import classification, regression

TASK = classification.Classification(3, ["a", "b", "c"])


class ToyClassifier(nn.Module):
    """Same call signature as the real classifiers; cheap to compile."""

    dropout: float = 0.0
    input_keys = ("input_ids", "attention_mask", "token_type_ids")

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train=False):
        x = nn.Embed(50, 16)(input_ids) + nn.Embed(2, 16)(token_type_ids)
        m = attention_mask[..., None].astype(x.dtype)
        x = (x * m).sum(1) / m.sum(1)
        x = layers.Dropout(self.dropout, deterministic=not train)(nn.tanh(nn.Dense(16)(x)))
        return nn.Dense(3, name="head")(x)


def _batches(n, batch=16, length=8, seed=0):
    rs = np.random.RandomState(seed)
    for _ in range(n):
        mask = (np.arange(length)[None] < rs.randint(2, length + 1, (batch, 1))).astype(np.int32)
        yield {"input_ids": rs.randint(1, 50, (batch, length)).astype(np.int32) * mask,
               "attention_mask": mask, "token_type_ids": np.zeros((batch, length), np.int32),
               "label": rs.randint(0, 3, (batch,)).astype(np.int32)}


def _losses(devices, accum_steps=1, dropout=0.0, steps=4):
    model = ToyClassifier(dropout)
    mesh = step_lib.make_mesh(devices)
    rep = step_lib.replicated(mesh)
    dummy = next(_batches(1))
    params = model.init(jax.random.key(0), dummy["input_ids"], dummy["attention_mask"],
                        dummy["token_type_ids"])["params"]
    c = common.base_config()
    c.optimizer.lr = 1e-2
    tx, _ = optim.make_optimizer(c, params, total_steps=steps)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
    state = jax.device_put(state, rep)
    shardings = jax.tree.map(lambda _: rep, state)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, TASK, accum_steps=accum_steps), mesh, shardings)
    losses = []
    for b in _batches(steps):
        state, m = train_step(state, step_lib.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    return np.array(losses), state


def test_one_and_eight_devices_give_the_same_losses():
    assert jax.device_count() == 8
    l1, s1 = _losses(jax.devices()[:1])
    l8, s8 = _losses(jax.devices())
    np.testing.assert_allclose(l1, l8, atol=1e-5)
    assert l1[-1] < l1[0]
    np.testing.assert_allclose(np.asarray(s1.params["head"]["kernel"]),
                               np.asarray(s8.params["head"]["kernel"]), atol=1e-5)


def test_gradient_accumulation_matches_the_full_batch():
    full, _ = _losses(jax.devices(), accum_steps=1)
    accum, _ = _losses(jax.devices(), accum_steps=2)
    np.testing.assert_allclose(full, accum, atol=1e-5)


def test_dropout_rng_depends_on_the_step_and_is_reproducible():
    a, _ = _losses(jax.devices(), dropout=0.5)
    b, _ = _losses(jax.devices(), dropout=0.5)
    no_dropout, _ = _losses(jax.devices(), dropout=0.0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, no_dropout)
    one, _ = _losses(jax.devices()[:1], dropout=0.5)  # the masks do not depend on the sharding
    np.testing.assert_allclose(one, a, atol=1e-5)


def test_eval_step_returns_sharded_logits_for_every_row():
    model = ToyClassifier()
    mesh = step_lib.make_mesh()
    b = next(_batches(1))
    params = model.init(jax.random.key(0), b["input_ids"], b["attention_mask"], b["token_type_ids"])["params"]
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model, TASK), mesh, step_lib.replicated(mesh))
    inputs = {k: b[k] for k in model.input_keys}
    logits = step_lib.to_host(eval_step({"params": params}, step_lib.shard_batch(inputs, mesh)))
    expected = model.apply({"params": params}, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert logits.shape == (16, 3)
    np.testing.assert_allclose(logits, np.asarray(expected), atol=1e-5)


def test_task_losses():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    loss, metrics = TASK.loss(logits, {"label": jnp.array([0, 1])})
    expected = -(jax.nn.log_softmax(logits[0])[0] + jax.nn.log_softmax(logits[1])[1]) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)
    loss, metrics = regression.Regression().loss(logits[:, :1], {"label": jnp.array([1.5, -1.0])})
    np.testing.assert_allclose(loss, (0.25 + 1.0) / 2)
    assert metrics == {}
