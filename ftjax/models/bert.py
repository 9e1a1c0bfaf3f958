"""BERT encoder in Flax Linen, built from an HF `config.json`.

Parameter paths (methods and optimizer rules target these by regex):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}   (2-D kernels)
  encoder/layer_{i}/attention_LayerNorm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/output_LayerNorm/{scale,bias}
  pooler/{kernel,bias}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models.layers import Adapter, Dense, Peft

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The HF BertConfig fields ftjax uses (same names)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "BertConfig":
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in hf.items() if k in names and v is not None})
        if cfg.hidden_act not in _ACTIVATIONS:
            raise UserError(f"hidden_act={cfg.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"position_embedding_type={hf['position_embedding_type']!r}: only absolute is supported")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise UserError(f"hidden_size {cfg.hidden_size} is not divisible by "
                            f"num_attention_heads {cfg.num_attention_heads}")
        return cfg


def _dense(cfg: BertConfig, features: int, name: str, dtype, peft: Peft) -> Dense:
    return Dense(features, name=name, dtype=dtype, peft=peft,
                 kernel_init=nn.initializers.normal(cfg.initializer_range))


def _layer_norm(cfg: BertConfig, name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, dtype=dtype, param_dtype=jnp.float32)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the PEFT hooks (LoRA via Dense, IA3, deep prefixes).

    Shared by the encoders: BERT (output Dense "out", padding bias) and ViT (output
    "output", no bias). `config` needs hidden_size, num_attention_heads and
    initializer_range.

    Attributes:
      kernel_init: the projections' init; None: normal(config.initializer_range).
      output_name: name of the output projection.
    """

    config: Any
    attention_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    kernel_init: Any = None
    output_name: str = "out"

    @nn.compact
    def __call__(self, x, bias=None, *, train: bool, prefix=None):
        cfg = self.config
        heads, width = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, width)  # noqa: E731
        init = self.kernel_init or nn.initializers.normal(cfg.initializer_range)
        dense = lambda name: Dense(cfg.hidden_size, name=name, dtype=self.dtype, peft=self.peft,  # noqa: E731
                                   kernel_init=init)
        q = dense("query")(x, train=train)
        k = dense("key")(x, train=train)
        v = dense("value")(x, train=train)
        if self.peft.ia3:
            ones = nn.initializers.ones
            k = k * self.param("ia3_key", ones, (cfg.hidden_size,), jnp.float32).astype(k.dtype)
            v = v * self.param("ia3_value", ones, (cfg.hidden_size,), jnp.float32).astype(v.dtype)
        if prefix is not None:  # deep prefix tuning: learned keys/values every query sees
            pk, pv = (jnp.broadcast_to(t.astype(k.dtype), (x.shape[0], *t.shape)) for t in prefix)
            k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
            if bias is not None:
                bias = jnp.concatenate([jnp.zeros((*bias.shape[:-1], pk.shape[1]), bias.dtype), bias], -1)
        q, k, v = split(q), split(k), split(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(width)
        probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
        probs = nn.Dropout(self.attention_dropout, deterministic=not train)(probs).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        return dense(self.output_name)(ctx, train=train)


class Layer(nn.Module):
    config: BertConfig
    dropout: float
    attention_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, bias, *, train: bool, prefix=None):
        cfg, peft = self.config, self.peft
        drop = nn.Dropout(self.dropout, deterministic=not train)
        attn = SelfAttention(cfg, self.attention_dropout, self.dtype, peft, name="attention")(
            x, bias, train=train, prefix=prefix)
        if peft.adapter == "houlsby":
            attn = Adapter(peft.adapter_size, peft.adapter_init_std, self.dtype, name="attention_adapter")(attn)
        x = _layer_norm(cfg, "attention_LayerNorm", self.dtype)(x + drop(attn))
        h = _dense(cfg, cfg.intermediate_size, "intermediate", self.dtype, peft)(x, train=train)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        if peft.ia3:
            h = h * self.param("ia3_ffn", nn.initializers.ones, (cfg.intermediate_size,), jnp.float32).astype(h.dtype)
        h = _dense(cfg, cfg.hidden_size, "output", self.dtype, peft)(h, train=train)
        if peft.adapter in ("houlsby", "pfeiffer"):
            h = Adapter(peft.adapter_size, peft.adapter_init_std, self.dtype, name="output_adapter")(h)
        return _layer_norm(cfg, "output_LayerNorm", self.dtype)(x + drop(h))


class Embeddings(nn.Module):
    config: BertConfig
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, train: bool):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        embed = lambda n, size: nn.Embed(size, cfg.hidden_size, name=n, embedding_init=init,  # noqa: E731
                                         dtype=self.dtype, param_dtype=jnp.float32)
        positions = jnp.arange(input_ids.shape[-1])[None]
        x = (embed("word_embeddings", cfg.vocab_size)(input_ids)
             + embed("position_embeddings", cfg.max_position_embeddings)(positions)
             + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids))
        x = _layer_norm(cfg, "LayerNorm", self.dtype)(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Encoder(nn.Module):
    config: BertConfig
    dropout: float
    attention_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, bias, *, train: bool):
        cfg, peft = self.config, self.peft
        prefixes = [None] * cfg.num_hidden_layers
        if peft.prefix_tokens:
            prefixes = PrefixEncoder(cfg, peft, name="prefix")()
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, self.dropout, self.attention_dropout, self.dtype, peft,
                      name=f"layer_{i}")(x, bias, train=train, prefix=prefixes[i])
        return x


class PrefixEncoder(nn.Module):
    """Per-layer (key, value) prefixes [n, hidden]: params, or an MLP over an embedding."""

    config: BertConfig
    peft: Peft

    @nn.compact
    def __call__(self):
        cfg, n = self.config, self.peft.prefix_tokens
        layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
        init = nn.initializers.normal(cfg.initializer_range)
        if self.peft.prefix_reparam:
            e = self.param("embedding", init, (n, hidden), jnp.float32)
            h = jnp.tanh(nn.Dense(self.peft.prefix_reparam, name="mlp_in")(e))
            kv = nn.Dense(layers * 2 * hidden, name="mlp_out")(h)
        else:
            kv = self.param("key_values", init, (n, layers * 2 * hidden), jnp.float32)
        kv = kv.reshape(n, layers, 2, hidden)
        return [(kv[:, i, 0], kv[:, i, 1]) for i in range(layers)]


class BertModel(nn.Module):
    """BERT: embeddings, post-LN transformer encoder and the [CLS] pooler.

    Attributes:
      config: the encoder's BertConfig.
      dtype: compute dtype (parameters stay float32).
      dropout_override: replaces hidden_dropout_prob when set.
      peft: parameter-efficient additions (LoRA, IA3, adapters, prompts, prefixes)
        switched on by a fine-tuning method.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    dropout_override: float | None = None
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, H], pooled_output [B, H])."""
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
        dropout = cfg.hidden_dropout_prob if self.dropout_override is None else self.dropout_override
        x = Embeddings(cfg, dropout, self.dtype, name="embeddings")(input_ids, token_type_ids, train=train)
        n_prompt = self.peft.prompt_tokens
        if n_prompt:  # soft prompt vectors before the tokens; they see and are seen by all
            prompt = self.param("prompt", nn.initializers.normal(cfg.initializer_range),
                                (n_prompt, cfg.hidden_size), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], *prompt.shape)), x], 1)
            attention_mask = jnp.concatenate(
                [jnp.ones((x.shape[0], n_prompt), attention_mask.dtype), attention_mask], 1)
        # Padding keys get a large negative bias (float32, so bf16 compute cannot overflow it).
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
        x = Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")(
            x, bias, train=train)
        x = x[:, n_prompt:]  # the head sees the real tokens only: [CLS] is first again
        pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler", self.dtype, self.peft)(x[:, 0], train=train))
        return x, pooled
