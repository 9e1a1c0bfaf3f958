"""EfficientNet-Lite0 train step: XLA's grouped conv vs ftjax's shifted-sum depthwise conv.

  python benchmarks/depthwise.py [--size=64] [--batch=64]

Prints forward and forward+backward seconds per batch for both, measured side by
side in one process, and their ratio. Why it exists: XLA:CPU lowers
feature_group_count convolutions slowly; ftjax.models.efficientnet.depthwise_conv
writes them as k*k multiply-adds with a hand-written backward.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from ftjax import models
from ftjax.models import efficientnet
from ftjax.tasks import classification


def grouped(x, w, stride):
    return lax.conv_general_dilated(x, w[:, :, None, :], (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def timed(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    config = models.variant_config("efficientnet", "lite0")
    model = classification.build_classifier("efficientnet", config, num_labels=10)
    x = jnp.zeros((a.batch, a.size, a.size, 3))
    variables = model.init(jax.random.key(0), x[:1])
    results = {}
    for name, impl in (("xla grouped conv", grouped), ("ftjax shifted sum", efficientnet._depthwise_impl)):
        efficientnet._depthwise_impl = impl
        fwd = jax.jit(lambda v: model.apply(v, x))
        grad = jax.jit(jax.grad(lambda p, v: model.apply({**v, "params": p}, x, train=True,
                                                          rngs={"dropout": jax.random.key(1)}).sum()))
        results[name] = (timed(fwd, variables), timed(grad, variables["params"], variables))
        print(f"{name:20s} forward {results[name][0]:.3f} s  forward+backward {results[name][1]:.3f} s "
              f"(batch {a.batch}, {a.size} px, {jax.devices()[0].platform})", flush=True)
    (f0, b0), (f1, b1) = results.values()
    print(f"speed-up: forward {f0 / f1:.1f}x, forward+backward {b0 / b1:.1f}x")


if __name__ == "__main__":
    main()
