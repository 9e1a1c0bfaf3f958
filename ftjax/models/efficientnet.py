"""EfficientNet-Lite0..4 (Tan & Le 2019; the TF "lite" variants) in Flax Linen.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-and-excite, and
the stem (32) and head (1280) widths and the first and last stages' repeats are not
scaled. Convolutions use TF "SAME" padding (asymmetric for stride 2) and BatchNorm
uses TF's epsilon 1e-3 and momentum 0.99, as the converted ImageNet weights expect.
The encoder returns the globally average-pooled head features [B, 1280] (before the
classifier's dropout).

The config is an ftjax-defined dict, {"model_type": "efficientnet", "variant": "lite0"},
where any EfficientNetConfig field may override the variant's.

Parameter paths (the classifier creates the encoder under "efficientnet"; every "bn*"
also has batch_stats {mean, var} at the same path; convs have no bias):
  efficientnet/stem/{conv/kernel, bn/{scale,bias}}
  efficientnet/blocks_{n}/expand_conv/kernel, .../bn0/{scale,bias}   (absent when expand ratio is 1)
  efficientnet/blocks_{n}/depthwise_conv/kernel [k, k, 1, C], .../bn1/{scale,bias}
  efficientnet/blocks_{n}/project_conv/kernel, .../bn2/{scale,bias}
  efficientnet/top/{conv/kernel, bn/{scale,bias}}   (the 1x1 head conv; "top", so that
    no encoder path looks like the classifier's "head")
Block n and the bn0/bn1/bn2 names follow the EfficientNet-PyTorch checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec
from ftjax.models.layers import Conv, Dropout, Peft
from ftjax.models.layout import Layout

# Stages of EfficientNet-B0 / Lite0: (repeats, kernel, stride, expand ratio, output channels).
_B0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
              (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# variant -> (width multiplier, depth multiplier, resolution, dropout), from TF's efficientnet_lite_builder.
LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
TINY_EFFICIENTNET = {
    "model_type": "efficientnet", "variant": "tiny", "stem_channels": 8, "head_channels": 32,
    "stages": [[1, 3, 1, 1, 8], [2, 3, 2, 4, 16], [1, 5, 2, 4, 24]], "image_size": 32,
}


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """An EfficientNet-Lite model: its scaling and stage table.

    Attributes:
      variant: "lite0".."lite4" or "tiny" (a test model with its own stages).
      width: channel multiplier of the blocks (stem and head are not scaled).
      depth: repeat multiplier of the middle stages (not the first and last).
      image_size: the resolution the variant was trained at.
      dropout_rate: the reference's dropout before its classifier (for the task head).
      drop_connect_rate: stochastic depth, growing linearly to this rate at the last block.
      stem_channels: stem conv width.
      head_channels: 1x1 head conv width (the feature size).
      stages: (repeats, kernel, stride, expand ratio, output channels) per stage, unscaled.
      num_classes: classes of the reference classifier (not part of the encoder).
      bn_momentum: running-average momentum (TF convention).
      bn_epsilon: BatchNorm epsilon.
    """

    variant: str = "lite0"
    width: float = 1.0
    depth: float = 1.0
    image_size: int = 224
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    stem_channels: int = 32
    head_channels: int = 1280
    stages: tuple[tuple[int, int, int, int, int], ...] = _B0_STAGES
    num_classes: int = 1000
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "EfficientNetConfig":
        """Builds the config from {"model_type": "efficientnet", "variant": ..., overrides...}."""
        variant = d.get("variant", "lite0")
        if variant in LITE_VARIANTS:
            w, dep, res, drop = LITE_VARIANTS[variant]
            base = {"width": w, "depth": dep, "image_size": res, "dropout_rate": drop}
        elif variant == "tiny":
            base = {"width": 1.0, "depth": 1.0, "image_size": 32, "dropout_rate": 0.1}
        else:
            raise UserError(f"EfficientNet variant {variant!r} is unknown; known: "
                            f"{', '.join([*LITE_VARIANTS, 'tiny'])}")
        names = {f.name for f in dataclasses.fields(cls)}
        base.update({k: v for k, v in d.items() if k in names and v is not None})
        base["variant"] = variant
        try:
            base["stages"] = tuple(tuple(int(v) for v in s) for s in base.get("stages", _B0_STAGES))
        except (TypeError, ValueError):
            raise UserError(f"EfficientNet stages {base['stages']!r} must be a list of "
                            "[repeats, kernel, stride, expand, channels]") from None
        if any(len(s) != 5 for s in base["stages"]) or not base["stages"]:
            raise UserError(f"EfficientNet stages {list(base['stages'])} must be [repeats, kernel, stride, "
                            "expand, channels] rows")
        return cls(**base)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's width scaling: nearest multiple of `divisor`, never 10% below the exact value."""
    if width == 1.0:
        return channels
    exact = channels * width
    new = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * exact else new)


def block_specs(config: EfficientNetConfig) -> list[tuple[int, int, int, int]]:
    """Every block's (kernel, stride, expand ratio, output channels), in order."""
    specs = []
    last = len(config.stages) - 1
    for i, (repeats, kernel, stride, expand, out) in enumerate(config.stages):
        if i not in (0, last):  # Lite keeps the first and last stages' repeats
            repeats = int(math.ceil(config.depth * repeats))
        out = round_filters(out, config.width)
        specs += [(kernel, stride if r == 0 else 1, expand, out) for r in range(repeats)]
    return specs


def layout(config: EfficientNetConfig) -> Layout:
    """Depth groups for the path-regex methods: the stem, then one group per block."""
    n = len(block_specs(config))
    return Layout(groups=(r".*/stem/.*",) + tuple(rf".*/blocks_{i}/.*" for i in range(n)),
                  top=(r".*/top/.*",), norms=r".*/bn\d?/(scale|bias)")


def _conv(features: int, kernel: int, stride: int, name: str, dtype, groups: int = 1) -> Conv:
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32, name=name,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"))


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (the extra pixel, if any, at the end), as nn.Conv's "SAME"."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _taps(xp: jax.Array, w: jax.Array, out_h: int, out_w: int, stride: int) -> jax.Array:
    """sum over kernel taps (i, j) of the strided window of xp at (i, j) times w[i, j]."""
    out = None
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            win = xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            out = win * w[i, j] if out is None else out + win * w[i, j]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """Depthwise kxk convolution with TF "SAME" padding, as k*k shifted multiply-adds.

    XLA:CPU lowers grouped convolutions (feature_group_count=C) poorly: on a 2-core CPU
    this form runs the forward about 25x and a train step about 3x faster, with the
    same numbers (to float rounding). The backward is written out (custom VJP): the
    input gradient is the same shifted sum over the flipped kernel (stride 1) or a sum
    of dilated pads (stride > 1); the kernel gradient is one reduction per tap.

    Args:
      x: [B, H, W, C].
      w: [k, k, C] per-channel kernel.
      stride: 1 or 2.

    Returns:
      [B, ceil(H / stride), ceil(W / stride), C].
    """
    return _depthwise_fwd(x, w, stride)[0]


def _depthwise_fwd(x, w, stride):
    (ph0, ph1), (pw0, pw1) = (_same_pads(x.shape[1], w.shape[0], stride),
                              _same_pads(x.shape[2], w.shape[1], stride))
    xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    return _taps(xp, w.astype(x.dtype), out_h, out_w, stride), (x, w)


def _depthwise_bwd(stride, res, g):
    x, w = res
    k_h, k_w = w.shape[0], w.shape[1]
    (ph0, ph1), (pw0, pw1) = _same_pads(x.shape[1], k_h, stride), _same_pads(x.shape[2], k_w, stride)
    xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
    hp, wp = xp.shape[1], xp.shape[2]
    out_h, out_w = g.shape[1], g.shape[2]
    wc = w.astype(g.dtype)
    if stride == 1:  # correlation of the padded gradient with the flipped kernel
        gp = jnp.pad(g, ((0, 0), (k_h - 1 - ph0, k_h - 1 - ph1), (k_w - 1 - pw0, k_w - 1 - pw1), (0, 0)))
        dx = _taps(gp, wc[::-1, ::-1], x.shape[1], x.shape[2], 1)
    else:  # each tap scatters g * w[i, j] back onto its strided window
        dxp = None
        for i in range(k_h):
            for j in range(k_w):
                pads = ((0, 0, 0), (i, hp - i - stride * (out_h - 1) - 1, stride - 1),
                        (j, wp - j - stride * (out_w - 1) - 1, stride - 1), (0, 0, 0))
                part = jax.lax.pad(g * wc[i, j], jnp.zeros((), g.dtype), pads)
                dxp = part if dxp is None else dxp + part
        dx = dxp[:, ph0:ph0 + x.shape[1], pw0:pw0 + x.shape[2], :]
    dw = jnp.stack([jnp.stack([
        (xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :] * g
         ).sum((0, 1, 2), dtype=jnp.float32) for j in range(k_w)]) for i in range(k_h)])
    return dx.astype(x.dtype), dw.astype(w.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)
_depthwise_impl = depthwise_conv  # benchmarks/depthwise.py swaps in XLA's grouped conv


class DepthwiseConv(nn.Module):
    """A depthwise kxk conv (no bias, TF "SAME" padding) with nn.Conv's kernel layout [k, k, 1, C]."""

    kernel: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal"),
                       (self.kernel, self.kernel, 1, x.shape[-1]), jnp.float32)
        return _depthwise_impl(x.astype(self.dtype), w[:, :, 0, :].astype(self.dtype), self.stride)


class ConvBN(nn.Module):
    """conv -> bn -> ReLU6: the stem and the head conv."""

    config: EfficientNetConfig
    features: int
    kernel: int
    stride: int
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _conv(self.features, self.kernel, self.stride, "conv", self.dtype)(x)
        x = nn.BatchNorm(use_running_average=self.use_running_average, momentum=cfg.bn_momentum,
                         epsilon=cfg.bn_epsilon, dtype=self.dtype, param_dtype=jnp.float32, name="bn")(x)
        return jax.nn.relu6(x)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project, + input when shapes allow."""

    config: EfficientNetConfig
    kernel: int
    stride: int
    expand: int
    features: int
    drop_rate: float = 0.0
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg = self.config
        bn = lambda name: nn.BatchNorm(use_running_average=self.use_running_average,  # noqa: E731
                                       momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon, dtype=self.dtype,
                                       param_dtype=jnp.float32, name=name)
        h = x
        wide = x.shape[-1] * self.expand
        if self.expand != 1:
            h = jax.nn.relu6(bn("bn0")(_conv(wide, 1, 1, "expand_conv", self.dtype)(h)))
        h = DepthwiseConv(self.kernel, self.stride, self.dtype, name="depthwise_conv")(h)
        h = jax.nn.relu6(bn("bn1")(h))
        h = bn("bn2")(_conv(self.features, 1, 1, "project_conv", self.dtype)(h))
        if self.stride == 1 and x.shape[-1] == self.features:
            # Drop connect: drop the whole residual branch per example (stochastic depth).
            h = Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(h)
            h = h + x
        return h


class EfficientNet(nn.Module):
    """EfficientNet-Lite encoder: stem, MBConv blocks, 1x1 head conv, global average pool.

    Attributes:
      config: the EfficientNetConfig.
      dtype: compute dtype (parameters stay float32).
      peft: accepted for a uniform encoder interface; no CNN method uses it.
      update_batch_stats: in train mode, normalise with batch statistics and update the
        running ones (apply with mutable=["batch_stats"]); otherwise the running
        statistics are used and never change.
    """

    config: EfficientNetConfig
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    update_batch_stats: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        """images: float32 NHWC [B, H, W, 3], normalised. Returns float32 features [B, head_channels]."""
        cfg = self.config
        frozen = not (train and self.update_batch_stats)
        x = ConvBN(cfg, cfg.stem_channels, 3, 2, frozen, self.dtype, name="stem")(images.astype(self.dtype))
        specs = block_specs(cfg)
        for n, (kernel, stride, expand, features) in enumerate(specs):
            rate = cfg.drop_connect_rate * n / len(specs)
            x = MBConv(cfg, kernel, stride, expand, features, rate, frozen, self.dtype, name=f"blocks_{n}")(
                x, train=train)
        x = ConvBN(cfg, cfg.head_channels, 1, 1, frozen, self.dtype, name="top")(x)
        return x.astype(jnp.float32).mean(axis=(1, 2))


def _encoder(cfg: EfficientNetConfig, opts: EncoderOptions, name: str) -> EfficientNet:
    return EfficientNet(cfg, dtype=opts.dtype, peft=opts.peft, update_batch_stats=opts.update_batch_stats,
                        name=name)


FAMILY = FamilySpec(
    name="efficientnet", model_types=("efficientnet",), modality="image",
    config_class=EfficientNetConfig, encoder=_encoder, layout=layout,
    converter="ftjax.convert.efficientnet",
    variants={"tiny": TINY_EFFICIENTNET,
              **{f"lite{i}": {"model_type": "efficientnet", "variant": f"lite{i}"} for i in range(5)}},
    # the reference's dropout before its classifier
    head_dropout=lambda cfg: float(cfg.dropout_rate))
