"""Vision Transformer (Dosovitskiy et al. 2021) in Flax Linen, HF ViTModel semantics.

The encoder returns the final-layernormed [CLS] token, the feature HF's
ViTForImageClassification feeds its classifier (no pooler).

Parameter paths (methods and optimizer rules target these by regex; the classifier
creates the encoder under "vit"):
  vit/embeddings/patch_embeddings/projection/{kernel,bias}   (conv kernel [p, p, C, D])
  vit/embeddings/{cls_token [1, 1, D], position_embeddings [1, 1 + N, D]}
  vit/encoder/layer_{i}/layernorm_before/{scale,bias}
  vit/encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}   (2-D kernels)
  vit/encoder/layer_{i}/layernorm_after/{scale,bias}
  vit/encoder/layer_{i}/{intermediate,output}/{kernel,bias}   (the MLP, named as BERT's)
  vit/layernorm/{scale,bias}
and with a fine-tuning method's additions (same names as BERT's):
  .../attention/{query,value}/lora_{a,b}, .../attention/ia3_{key,value}, layer_{i}/ia3_ffn,
  layer_{i}/{attention,output}_adapter/{down,up}/..., vit/prompt, vit/encoder/prefix/...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec
from ftjax.models.layers import ACTIVATIONS, Adapter, Conv, Dense, Dropout, Peft, PrefixEncoder, SelfAttention, config_from_hf
from ftjax.models.layout import Layout

TINY_VIT = {
    "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "hidden_act": "gelu", "image_size": 32, "patch_size": 8, "num_channels": 3,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-12,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The HF ViTConfig fields ftjax uses (same names)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ViTConfig":
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        cfg = config_from_hf(cls, hf)
        if not hf.get("qkv_bias", True):
            raise UserError("qkv_bias=false ViTs are not supported: ftjax's attention projections have biases")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise UserError(f"hidden_size {cfg.hidden_size} is not divisible by "
                            f"num_attention_heads {cfg.num_attention_heads}")
        for key in ("image_size", "patch_size"):
            if not isinstance(getattr(cfg, key), int):
                raise UserError(f"{key}={getattr(cfg, key)!r}: ftjax's ViT needs one int (square images/patches)")
        return cfg


def layout(config: ViTConfig) -> Layout:
    """Depth groups for the path-regex methods: embeddings (and a VPT prompt), then each layer."""
    return Layout(groups=(r".*/embeddings/.*|(.*/)?prompt",)
                  + tuple(rf".*/layer_{i}/.*" for i in range(config.num_hidden_layers)),
                  top=(r"(.*/)?vit/layernorm/.*",), norms=r".*layernorm.*")


def grid_size(config: ViTConfig, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid (rows, cols) of images of `image_size` (default: the config's).

    Args:
      config: the ViT config (its patch_size).
      image_size: an int (square) or (height, width); None means config.image_size.

    Returns:
      (height // patch_size, width // patch_size).
    """
    size = config.image_size if image_size is None else image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    p = config.patch_size
    if h % p or w % p:
        raise UserError(f"image size {h}x{w} is not a multiple of the ViT patch size {p}")
    return h // p, w // p


def resample_posemb(posemb: np.ndarray, new_grid: tuple[int, int],
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """Resamples ViT position embeddings [1, 1 + N, D] to another patch grid.

    The [CLS] position is kept as is; the N patch positions are treated as an image
    and resized bicubically (as timm and HF's interpolate_pos_encoding do).

    Args:
      posemb: [1, 1 + gh * gw, D] position embeddings, [CLS] first.
      new_grid: the target (rows, cols), e.g. `grid_size(config, image_size)`.
      old_grid: the source grid; None means square (sqrt(N) x sqrt(N)).

    Returns:
      float32 [1, 1 + new_rows * new_cols, D]; the input itself when the grid is unchanged.
    """
    posemb = np.asarray(posemb, np.float32)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise UserError(f"position embeddings of shape {posemb.shape}: expected [1, 1 + patches, hidden]")
    n, dim = posemb.shape[1] - 1, posemb.shape[2]
    if old_grid is None:
        side = int(round(math.sqrt(n)))
        if side * side != n:
            raise UserError(f"{n} patch position embeddings are not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise UserError(f"old_grid {old_grid} does not hold the {n} patch position embeddings")
    new_grid = tuple(int(g) for g in new_grid)
    if new_grid == tuple(old_grid):
        return posemb
    grid = posemb[0, 1:].reshape(*old_grid, dim)
    resized = jax.image.resize(grid, (*new_grid, dim), method="bicubic", antialias=False)
    resized = np.asarray(resized, np.float32).reshape(1, new_grid[0] * new_grid[1], dim)
    return np.concatenate([posemb[:, :1], resized], axis=1)


def _dense(cfg: ViTConfig, features: int, name: str, dtype, peft: Peft) -> Dense:
    return Dense(features, name=name, dtype=dtype, peft=peft,
                 kernel_init=nn.initializers.truncated_normal(cfg.initializer_range))


def _layer_norm(cfg: ViTConfig, name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, dtype=dtype, param_dtype=jnp.float32)


class Layer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x))."""

    config: ViTConfig
    dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool, prefix=None):
        cfg, peft = self.config, self.peft
        drop = Dropout(self.dropout, deterministic=not train)
        h = _layer_norm(cfg, "layernorm_before", self.dtype)(x)
        h = SelfAttention(cfg, cfg.attention_probs_dropout_prob, self.dtype, peft, name="attention",
                          kernel_init=nn.initializers.truncated_normal(cfg.initializer_range),
                          output_name="output")(h, train=train, prefix=prefix)
        if peft.adapter == "houlsby":
            h = Adapter(peft.adapter_size, peft.adapter_init_std, self.dtype, name="attention_adapter")(h)
        x = x + drop(h)
        h = _layer_norm(cfg, "layernorm_after", self.dtype)(x)
        h = ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "intermediate", self.dtype, peft)(
            h, train=train))
        if peft.ia3:
            h = h * self.param("ia3_ffn", nn.initializers.ones, (cfg.intermediate_size,), jnp.float32).astype(h.dtype)
        h = _dense(cfg, cfg.hidden_size, "output", self.dtype, peft)(h, train=train)
        if peft.adapter in ("houlsby", "pfeiffer"):
            h = Adapter(peft.adapter_size, peft.adapter_init_std, self.dtype, name="output_adapter")(h)
        return x + drop(h)


class _PatchEmbeddings(nn.Module):
    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        cfg, p = self.config, self.config.patch_size
        return Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=True,
                    kernel_init=nn.initializers.truncated_normal(cfg.initializer_range),
                    dtype=self.dtype, param_dtype=jnp.float32, name="projection")(images)


class Embeddings(nn.Module):
    """Patch projection, [CLS] token and learned position embeddings for a fixed grid."""

    config: ViTConfig
    grid: tuple[int, int]
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, train: bool):
        cfg = self.config
        init = nn.initializers.truncated_normal(cfg.initializer_range)
        x = _PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(images)
        if tuple(x.shape[1:3]) != tuple(self.grid):
            raise UserError(f"images of {images.shape[1]}x{images.shape[2]} give a {x.shape[1]}x{x.shape[2]} "
                             f"patch grid; this ViT was built for {self.grid[0]}x{self.grid[1]} "
                             f"(set its image_size)")
        x = x.reshape(x.shape[0], -1, cfg.hidden_size)
        cls = self.param("cls_token", init, (1, 1, cfg.hidden_size), jnp.float32)
        pos = self.param("position_embeddings", init, (1, 1 + self.grid[0] * self.grid[1], cfg.hidden_size),
                         jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size)), x], 1)
        x = x + pos.astype(x.dtype)
        return Dropout(self.dropout, deterministic=not train)(x)


class Encoder(nn.Module):
    config: ViTConfig
    dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool):
        cfg, peft = self.config, self.peft
        prefixes = [None] * cfg.num_hidden_layers
        if peft.prefix_tokens:
            prefixes = PrefixEncoder(cfg, peft, name="prefix")()
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, self.dropout, self.dtype, peft, name=f"layer_{i}")(x, train=train, prefix=prefixes[i])
        return x


class ViTModel(nn.Module):
    """ViT encoder: patches + [CLS] -> pre-LN transformer -> final LayerNorm -> [CLS] feature.

    Attributes:
      config: the encoder's ViTConfig.
      dtype: compute dtype (parameters stay float32).
      peft: parameter-efficient additions (LoRA, IA3, adapters, VPT prompts, prefixes).
      image_size: the input size the position embeddings are made for; None means
        config.image_size. Pretrained embeddings of another grid are fitted with
        `resample_posemb(posemb, grid_size(config, image_size))`.
      dropout_override: replaces hidden_dropout_prob when set.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    image_size: int | tuple[int, int] | None = None
    dropout_override: float | None = None

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        """images: float32 NHWC [B, H, W, C], normalised. Returns float32 features [B, hidden]."""
        cfg, peft = self.config, self.peft
        dropout = cfg.hidden_dropout_prob if self.dropout_override is None else self.dropout_override
        grid = grid_size(cfg, self.image_size)
        x = Embeddings(cfg, grid, dropout, self.dtype, name="embeddings")(images.astype(self.dtype), train=train)
        if peft.prompt_tokens:  # VPT-shallow: prompt vectors right after [CLS], no position embedding
            prompt = self.param("prompt", nn.initializers.normal(cfg.initializer_range),
                                (peft.prompt_tokens, cfg.hidden_size), jnp.float32)
            prompt = jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], *prompt.shape))
            x = jnp.concatenate([x[:, :1], prompt, x[:, 1:]], 1)
        x = Encoder(cfg, dropout, self.dtype, peft, name="encoder")(x, train=train)
        x = _layer_norm(cfg, "layernorm", self.dtype)(x[:, 0])
        return x.astype(jnp.float32)


def fit_position_embeddings(loaded: dict, variables: dict) -> dict:
    """Resamples pretrained position embeddings to this run's patch grid (e.g. 224 -> 384 px).

    The FamilySpec `load` hook: runs on the converted variables before the strict merge.
    """
    from ftjax.logs import info

    try:
        old = loaded["params"]["vit"]["embeddings"]["position_embeddings"]
        new = variables["params"]["vit"]["embeddings"]["position_embeddings"]
    except KeyError:
        return loaded  # the strict merge names what is missing
    if old.shape != new.shape:
        side = int(round((new.shape[1] - 1) ** 0.5))
        info(f"ViT position embeddings resampled from {old.shape[1] - 1} to {new.shape[1] - 1} patches")
        loaded = jax.tree.map(lambda x: x, loaded)  # a copy; the conversion cache stays as it is
        loaded["params"]["vit"]["embeddings"]["position_embeddings"] = resample_posemb(old, (side, side))
    return loaded


def _vit(hidden: int, layers: int, n_heads: int, mlp: int, patch: int = 16, image: int = 224) -> dict[str, Any]:
    return {"model_type": "vit", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": n_heads,
            "intermediate_size": mlp, "patch_size": patch, "image_size": image, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _encoder(cfg: ViTConfig, opts: EncoderOptions, name: str) -> ViTModel:
    return ViTModel(cfg, dtype=opts.dtype, peft=opts.peft, image_size=opts.image_size,
                    dropout_override=opts.dropout, name=name)


FAMILY = FamilySpec(
    name="vit", model_types=("vit",), modality="image",
    config_class=ViTConfig, encoder=_encoder, layout=layout,
    converter="ftjax.convert.vit", provides=("attention",), load=fit_position_embeddings,
    variants={"tiny": TINY_VIT, "ti16": _vit(192, 12, 3, 768), "s16": _vit(384, 12, 6, 1536),
              "b16": _vit(768, 12, 12, 3072), "b32": _vit(768, 12, 12, 3072, patch=32),
              "l16": _vit(1024, 24, 16, 4096)})
