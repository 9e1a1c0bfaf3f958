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
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec, HFExport
from ftjax.models.layers import (ACTIVATIONS, Adapter, Dense, Peft, PrefixEncoder, SelfAttention,
                                  config_from_hf, padding_bias, prepend_prompt)
from ftjax.models.layout import bert_layout

# Small enough that a train step compiles in about a second on a CPU.
TINY_BERT = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
    "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "model_type": "bert",
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
        cfg = config_from_hf(cls, hf)
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


class Layer(nn.Module):
    config: BertConfig
    dropout: float
    attention_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    attention_residual_dropout: bool = True  # DistilBERT adds the attention output undropped

    @nn.compact
    def __call__(self, x, bias, *, train: bool, prefix=None):
        cfg, peft = self.config, self.peft
        drop = nn.Dropout(self.dropout, deterministic=not train)
        attn = SelfAttention(cfg, self.attention_dropout, self.dtype, peft, name="attention")(
            x, bias, train=train, prefix=prefix)
        if peft.adapter == "houlsby":
            attn = Adapter(peft.adapter_size, peft.adapter_init_std, self.dtype, name="attention_adapter")(attn)
        x = _layer_norm(cfg, "attention_LayerNorm", self.dtype)(
            x + (drop(attn) if self.attention_residual_dropout else attn))
        h = _dense(cfg, cfg.intermediate_size, "intermediate", self.dtype, peft)(x, train=train)
        h = ACTIVATIONS[cfg.hidden_act](h)
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
    attention_residual_dropout: bool = True

    @nn.compact
    def __call__(self, x, bias, *, train: bool):
        cfg, peft = self.config, self.peft
        prefixes = [None] * cfg.num_hidden_layers
        if peft.prefix_tokens:
            prefixes = PrefixEncoder(cfg, peft, name="prefix")()
        for i in range(cfg.num_hidden_layers):
            x = Layer(cfg, self.dropout, self.attention_dropout, self.dtype, peft, self.attention_residual_dropout,
                      name=f"layer_{i}")(x, bias, train=train, prefix=prefixes[i])
        return x


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
        x, attention_mask = prepend_prompt(self, x, attention_mask, self.peft, cfg.initializer_range)
        x = Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")(
            x, padding_bias(attention_mask), train=train)
        x = x[:, self.peft.prompt_tokens:]  # the head sees the real tokens only: [CLS] is first again
        pooled = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler", self.dtype, self.peft)(x[:, 0], train=train))
        return x, pooled


def _encoder(cfg: BertConfig, opts: EncoderOptions, name: str) -> BertModel:
    return BertModel(cfg, dtype=opts.dtype, dropout_override=opts.dropout, peft=opts.peft, name=name)


def _check_export(meta: dict) -> None:
    if meta.get("pooling") != "pooler":
        raise UserError(f"this run pools with {meta.get('pooling')!r}; HF's BertForSequenceClassification "
                        "classifies the [CLS] pooler output, so its logits would differ: fine-tune with "
                        "--config.model.pooling=pooler to export")


FAMILY = FamilySpec(
    name="bert", model_types=("bert",), modality="text", config_class=BertConfig, encoder=_encoder,
    layout=lambda cfg: bert_layout(cfg.num_hidden_layers), converter="ftjax.convert.bert",
    variants={"tiny": TINY_BERT}, provides=("attention",),
    optional=(r".*/pooler/.*",),  # sentence-transformers exports (ONNX MiniLM-L3) ship no pooler
    hf_export=HFExport("BertForSequenceClassification", "bert", _check_export))
