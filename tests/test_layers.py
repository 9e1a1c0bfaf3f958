"""Shared layers with their own kernels: Dropout (16-bit keep masks), exact GELU, Conv (matmul paths)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import layers


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_and_mean_match_the_rate(rate):
    x = jnp.ones((64, 33, 96))  # odd middle dimension; even last
    y = layers.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y != 0)
    n = kept.size
    # binomial: 5 standard deviations
    assert abs(kept.mean() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)
    scale = np.unique(np.asarray(y)[kept])
    assert len(scale) == 1 and scale[0] == pytest.approx(1 / (1 - rate), rel=1e-4)
    t = round((1 - rate) * 65536)
    assert scale[0] == np.float32(65536 / t)  # E[y] = x exactly for the realised keep probability


def test_odd_last_dimension_and_scalar():
    x = jnp.ones((1000, 7))
    y = layers.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert y.shape == x.shape and 0.45 < float((y != 0).mean()) < 0.55
    col = np.asarray(y != 0).mean(0)  # the last (unpaired) column is random too
    assert np.all((col > 0.4) & (col < 0.6)), col
    s = layers.Dropout(0.5).apply({}, jnp.ones(()), deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert s.shape == () and float(s) in (0.0, 2.0)


def test_neighbouring_elements_are_independent():
    # the two 16-bit halves of one 32-bit draw must not be correlated
    x = jnp.ones((4096, 64))
    kept = np.asarray(layers.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)}) != 0)
    even, odd = kept[:, 0::2].ravel(), kept[:, 1::2].ravel()
    assert abs(np.corrcoef(even, odd)[0, 1]) < 0.02


def test_deterministic_rate_zero_and_one_and_broadcast_dims():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    rngs = {"dropout": jax.random.key(4)}
    assert (layers.Dropout(0.3).apply({}, x, deterministic=True) == x).all()
    assert (layers.Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs) == x).all()
    assert (layers.Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs) == 0).all()
    y = layers.Dropout(0.5, broadcast_dims=(1, 2, 3)).apply({}, x, deterministic=False, rngs=rngs)
    per_example = np.asarray(y != 0).reshape(8, -1)
    assert np.all(per_example.all(1) | ~per_example.any(1))  # whole examples kept or dropped
    assert 0 < per_example.all(1).sum() < 8


def test_same_auto_names_and_rng_streams_as_flax_dropout():
    """A module that swaps nn.Dropout for layers.Dropout draws from the same make_rng streams."""

    def net(cls):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                a = cls(0.5)(x, deterministic=False)
                b = cls(0.5)(x, deterministic=False)
                return a, b, self.scope.path

        return Net()

    keys = []

    class Spy(layers.Dropout):
        def __call__(self, inputs, deterministic=None, rng=None):
            rng = self.make_rng("dropout")
            keys.append((self.name, jax.random.key_data(rng)))
            return inputs

    Spy.__name__ = "Dropout"
    net(Spy).apply({}, jnp.ones((2, 4)), rngs={"dropout": jax.random.key(5)})
    flax_keys = []

    class FlaxSpy(nn.Dropout):
        def __call__(self, inputs, deterministic=None, rng=None):
            rng = self.make_rng("dropout")
            flax_keys.append((self.name, jax.random.key_data(rng)))
            return inputs

    FlaxSpy.__name__ = "Dropout"
    net(FlaxSpy).apply({}, jnp.ones((2, 4)), rngs={"dropout": jax.random.key(5)})
    assert [k[0] for k in keys] == ["Dropout_0", "Dropout_1"] == [k[0] for k in flax_keys]
    for (_, a), (_, b) in zip(keys, flax_keys):
        np.testing.assert_array_equal(a, b)


def test_gelu_is_the_exact_erf_form():
    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    want = np.array([v * (1 + math.erf(v / math.sqrt(2))) / 2 for v in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(layers.gelu(jnp.asarray(x))), want, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda v: layers.gelu(v).sum())(jnp.asarray(x))),
                               np.asarray(jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(jnp.asarray(x))),
                               atol=2e-6)


@pytest.mark.parametrize("kernel,stride,padding,groups", [
    (1, 1, "SAME", 1), (1, 2, "SAME", 1), (1, 2, ((0, 0), (0, 0)), 1),  # matmul over channels
    (4, 4, "VALID", 1),                                                  # patches (ViT)
    (3, 1, ((1, 1), (1, 1)), 1), (3, 2, "SAME", 1), (1, 1, "SAME", 2),   # convolutions
])
def test_conv_equals_flax_conv_on_every_path(kernel, stride, padding, groups):
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 8))
    kw = dict(strides=(stride, stride), padding=padding, feature_group_count=groups)
    ours = layers.Conv(6, (kernel, kernel), use_bias=True, **kw)
    ref = nn.Conv(6, (kernel, kernel), use_bias=True, **kw)
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(ours.init(jax.random.key(1), x)["params"]["kernel"], params["params"]["kernel"])
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5)
    g_ours = jax.grad(lambda p: (ours.apply(p, x) ** 2).sum())(params)
    g_ref = jax.grad(lambda p: (ref.apply(p, x) ** 2).sum())(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


def test_pointwise_and_patch_convs_lower_to_dots_not_convolutions():
    x = jnp.ones((1, 8, 8, 4))
    for conv in (layers.Conv(4, (1, 1), strides=(2, 2)), layers.Conv(4, (4, 4), strides=(4, 4), padding="VALID")):
        params = conv.init(jax.random.key(0), x)
        hlo = jax.jit(conv.apply).lower(params, x).as_text()
        assert "convolution" not in hlo and "dot_general" in hlo, hlo[:2000]
