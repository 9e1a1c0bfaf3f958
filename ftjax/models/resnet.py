"""ResNet v1.5 (He et al. 2016; stride on the bottleneck's 3x3 conv) with HF ResNetModel semantics.

The encoder returns the globally average-pooled last stage, the feature HF's
ResNetForImageClassification feeds its classifier. Convolutions have no biases;
BatchNorm statistics live in the "batch_stats" collection.

Parameter paths (the classifier creates the encoder under "resnet"; every
"normalization" also has batch_stats {mean, var} at the same path):
  resnet/embedder/convolution/kernel [7, 7, C, E], resnet/embedder/normalization/{scale,bias}
  resnet/encoder/stages_{s}/layers_{l}/layer_{k}/{convolution/kernel, normalization/{scale,bias}}
  resnet/encoder/stages_{s}/layers_{l}/shortcut/{convolution/kernel, normalization/{scale,bias}}
(k = 0..1 for "basic" blocks, 0..2 for "bottleneck"; a shortcut only where the block
changes width or stride), the same nesting as HF's tensor names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec
from ftjax.models.layers import ACTIVATIONS, Conv, Peft, config_from_hf
from ftjax.models.layout import Layout

TINY_RESNET = {
    "model_type": "resnet", "num_channels": 3, "embedding_size": 8, "hidden_sizes": [16, 32],
    "depths": [1, 1], "layer_type": "bottleneck", "hidden_act": "relu", "downsample_in_first_stage": False,
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The HF ResNetConfig fields ftjax uses (same names)."""

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    bn_momentum: float = 0.9  # BatchNorm running-average momentum (flax convention: torch's 0.1)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ResNetConfig":
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        ints = lambda v: tuple(int(x) for x in v)  # noqa: E731
        cfg = config_from_hf(cls, hf, hidden_sizes=ints, depths=ints)
        if cfg.layer_type not in ("basic", "bottleneck"):
            raise UserError(f"layer_type={cfg.layer_type!r} is not basic or bottleneck")
        if len(cfg.hidden_sizes) != len(cfg.depths) or not cfg.depths:
            raise UserError(f"hidden_sizes {list(cfg.hidden_sizes)} and depths {list(cfg.depths)} "
                            "must name the same (non-zero) number of stages")
        return cfg


def layout(config: ResNetConfig) -> Layout:
    """Depth groups for the path-regex methods: the stem, then one group per stage."""
    return Layout(groups=(r".*/embedder/.*",) + tuple(rf".*/stages_{s}/.*" for s in range(len(config.depths))),
                  norms=r".*/normalization/(scale|bias)")


class ConvLayer(nn.Module):
    """Conv (no bias, symmetric k // 2 padding as PyTorch) -> BatchNorm -> optional activation."""

    features: int
    kernel: int = 3
    stride: int = 1
    activation: str | None = "relu"
    use_running_average: bool = True
    dtype: Any = jnp.float32
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x):
        pad = self.kernel // 2
        x = Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                 padding=((pad, pad), (pad, pad)), dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                 name="convolution")(x)
        x = nn.BatchNorm(use_running_average=self.use_running_average, momentum=self.momentum, epsilon=1e-5,
                         dtype=self.dtype, param_dtype=jnp.float32, name="normalization")(x)
        return x if self.activation is None else ACTIVATIONS[self.activation](x)


class Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1; width / 4 inside) residual block."""

    config: ResNetConfig
    features: int
    stride: int = 1
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, act = self.config, self.config.hidden_act
        conv = lambda i, f, k, s, a: ConvLayer(f, k, s, a, self.use_running_average, self.dtype,  # noqa: E731
                                               cfg.bn_momentum, name=f"layer_{i}")
        residual = x
        if x.shape[-1] != self.features or self.stride != 1:
            residual = ConvLayer(self.features, 1, self.stride, None, self.use_running_average, self.dtype,
                                 cfg.bn_momentum, name="shortcut")(x)
        if cfg.layer_type == "basic":
            h = conv(0, self.features, 3, self.stride, act)(x)
            h = conv(1, self.features, 3, 1, None)(h)
        else:
            inner = self.features // 4
            first, middle = (self.stride, 1) if cfg.downsample_in_bottleneck else (1, self.stride)
            h = conv(0, inner, 1, first, act)(x)
            h = conv(1, inner, 3, middle, act)(h)
            h = conv(2, self.features, 1, 1, None)(h)
        return ACTIVATIONS[act](h + residual)


class Stage(nn.Module):
    config: ResNetConfig
    features: int
    depth: int
    stride: int
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = Block(self.config, self.features, self.stride if i == 0 else 1, self.use_running_average,
                      self.dtype, name=f"layers_{i}")(x)
        return x


class Encoder(nn.Module):
    config: ResNetConfig
    use_running_average: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        for s, (features, depth) in enumerate(zip(cfg.hidden_sizes, cfg.depths)):
            stride = 2 if s > 0 or cfg.downsample_in_first_stage else 1
            x = Stage(cfg, features, depth, stride, self.use_running_average, self.dtype, name=f"stages_{s}")(x)
        return x


class ResNetModel(nn.Module):
    """ResNet encoder: 7x7/2 conv + 3x3/2 max pool, residual stages, global average pool.

    Attributes:
      config: the encoder's ResNetConfig.
      dtype: compute dtype (parameters stay float32).
      peft: accepted for a uniform encoder interface; no CNN method uses it.
      update_batch_stats: in train mode, normalise with batch statistics and update the
        running ones (apply with mutable=["batch_stats"]); otherwise the running
        statistics are used and never change.
    """

    config: ResNetConfig
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    update_batch_stats: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        """images: float32 NHWC [B, H, W, C], normalised. Returns float32 features [B, hidden_sizes[-1]]."""
        cfg = self.config
        frozen = not (train and self.update_batch_stats)
        x = ConvLayer(cfg.embedding_size, 7, 2, cfg.hidden_act, frozen, self.dtype, cfg.bn_momentum,
                      name="embedder")(images.astype(self.dtype))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = Encoder(cfg, frozen, self.dtype, name="encoder")(x)
        return x.astype(jnp.float32).mean(axis=(1, 2))


def _resnet(kind: str, depths: list[int]) -> dict[str, Any]:
    sizes = [64, 128, 256, 512] if kind == "basic" else [256, 512, 1024, 2048]
    return {"model_type": "resnet", "layer_type": kind, "depths": depths, "hidden_sizes": sizes,
            "embedding_size": 64, "num_channels": 3, "hidden_act": "relu", "downsample_in_first_stage": False}


def _encoder(cfg: ResNetConfig, opts: EncoderOptions, name: str) -> ResNetModel:
    return ResNetModel(cfg, dtype=opts.dtype, peft=opts.peft, update_batch_stats=opts.update_batch_stats, name=name)


FAMILY = FamilySpec(
    name="resnet", model_types=("resnet",), modality="image",
    config_class=ResNetConfig, encoder=_encoder, layout=layout,
    converter="ftjax.convert.resnet",
    variants={"tiny": TINY_RESNET, "18": _resnet("basic", [2, 2, 2, 2]), "34": _resnet("basic", [3, 4, 6, 3]),
              "50": _resnet("bottleneck", [3, 4, 6, 3]), "101": _resnet("bottleneck", [3, 4, 23, 3])})
