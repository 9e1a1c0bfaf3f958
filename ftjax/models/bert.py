"""BERT encoder in Flax Linen, built from an HF `config.json`.

Parameter paths (methods and optimizer rules target these by regex):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}   (2-D kernels)
  encoder/layer_{i}/attention_LayerNorm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/output_LayerNorm/{scale,bias}
  pooler/{kernel,bias}

The other post-LN text families (RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, MPNet) build on
the pieces here: `Block` / `post_attention` (a layer after its attention), `Embeddings`,
`TextEncoder` / `encode` (prompt, layers, pooler), `encoder_of` and `pooler_export`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec, HFExport
from ftjax.models.layers import (
    ACTIVATIONS, Dropout,
    Adapter,
    Peft,
    PrefixEncoder,
    SelfAttention,
    check_absolute_positions,
    check_heads,
    config_from_hf,
    layer_norm,
    normal_dense,
    padding_bias,
    prepend_prompt,
)
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
        check_absolute_positions(hf)
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        return cfg


class Block(nn.Module):
    """The fields of a transformer layer and of a stack of them (BERT's and DeBERTa's).

    Attributes:
      config: the family's config (BERT names: hidden_size, num_attention_heads, ...).
      dropout: the hidden dropout.
      attention_dropout: dropout on the attention probabilities.
      dtype: compute dtype (parameters stay float32).
      peft: parameter-efficient additions switched on by a fine-tuning method.
    """

    config: Any
    dropout: float
    attention_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()


def post_attention(layer: Block, x, attn, *, train: bool, attention_residual_dropout: bool = True):
    """The rest of a post-LN transformer layer after its self-attention, with the PEFT hooks.

    [Houlsby adapter] -> residual -> "attention_LayerNorm" -> FFN ("intermediate", act,
    IA3 "ia3_ffn", "output", [adapter]) -> residual -> "output_LayerNorm". Call it inside
    `layer`'s compact __call__: every module and param is `layer`'s own, so the
    parameter paths and dropout streams are those of a layer that wrote it inline.

    Args:
      layer: the calling layer.
      x: the layer input [B, L, H].
      attn: the attention output (after its output projection) [B, L, H].
      train: dropout on.
      attention_residual_dropout: drop out `attn` before its residual (DistilBERT does not).

    Returns:
      The layer output [B, L, H].
    """
    cfg, peft, dtype = layer.config, layer.peft, layer.dtype
    drop = Dropout(layer.dropout, deterministic=not train)
    if peft.adapter == "houlsby":
        attn = Adapter(peft.adapter_size, peft.adapter_init_std, dtype, name="attention_adapter")(attn)
    x = layer_norm(cfg, "attention_LayerNorm", dtype)(x + (drop(attn) if attention_residual_dropout else attn))
    h = normal_dense(cfg, cfg.intermediate_size, "intermediate", dtype, peft)(x, train=train)
    h = ACTIVATIONS[cfg.hidden_act](h)
    if peft.ia3:
        h = h * layer.param("ia3_ffn", nn.initializers.ones, (cfg.intermediate_size,), jnp.float32).astype(h.dtype)
    h = normal_dense(cfg, cfg.hidden_size, "output", dtype, peft)(h, train=train)
    if peft.adapter in ("houlsby", "pfeiffer"):
        h = Adapter(peft.adapter_size, peft.adapter_init_std, dtype, name="output_adapter")(h)
    return layer_norm(cfg, "output_LayerNorm", dtype)(x + drop(h))


class Layer(Block):
    attention_residual_dropout: bool = True  # DistilBERT adds the attention output undropped

    @nn.compact
    def __call__(self, x, bias, *, train: bool, prefix=None):
        attn = SelfAttention(self.config, self.attention_dropout, self.dtype, self.peft, name="attention")(
            x, bias, train=train, prefix=prefix)
        return post_attention(self, x, attn, train=train, attention_residual_dropout=self.attention_residual_dropout)


class Embeddings(nn.Module):
    """Word + absolute position (+ token type) embeddings, LayerNorm, dropout."""

    config: Any
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, train: bool, positions=None):
        """Embeds `input_ids` [B, L].

        Args:
          input_ids: int [B, L] token ids.
          token_type_ids: int [B, L] segment ids; None: the family has no token-type table.
          train: dropout on.
          positions: int [B or 1, L] position ids; None: 0, 1, 2, ...

        Returns:
          [B, L, hidden_size].
        """
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        embed = lambda n, size: nn.Embed(size, cfg.hidden_size, name=n, embedding_init=init,  # noqa: E731
                                         dtype=self.dtype, param_dtype=jnp.float32)
        if positions is None:
            positions = jnp.arange(input_ids.shape[-1])[None]
        x = (embed("word_embeddings", cfg.vocab_size)(input_ids)
             + embed("position_embeddings", cfg.max_position_embeddings)(positions))
        if token_type_ids is not None:
            x = x + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids)
        x = layer_norm(cfg, "LayerNorm", self.dtype)(x)
        return Dropout(self.dropout, deterministic=not train)(x)


class Encoder(Block):
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


class TextEncoder(nn.Module):
    """The fields every text encoder model is built with (see `encoder_of`).

    Attributes:
      config: the family's encoder config dataclass.
      dtype: compute dtype (parameters stay float32).
      dropout_override: replaces the config's hidden dropout when set.
      peft: parameter-efficient additions (LoRA, IA3, adapters, prompts, prefixes)
        switched on by a fine-tuning method.
    """

    config: Any
    dtype: Any = jnp.float32
    dropout_override: float | None = None
    peft: Peft = Peft()


def hidden_dropout(model: TextEncoder) -> float:
    """The model's hidden dropout: `dropout_override`, else the config's hidden_dropout_prob."""
    return model.config.hidden_dropout_prob if model.dropout_override is None else model.dropout_override


def check_positions(length: int, max_position_embeddings: int) -> None:
    """One clear line when an input is longer than the absolute position table."""
    if length > max_position_embeddings:
        raise UserError(f"sequence length {length} exceeds the model's max_position_embeddings "
                        f"{max_position_embeddings}: lower config.data.max_length")


def encode(model: TextEncoder, x, attention_mask, encoder: nn.Module, *, train: bool,
           activation: Callable, pooler_dropout: float | None = None, project: Callable | None = None,
           bias: Callable = padding_bias):
    """The text encoders' shared body after the embeddings: prompt, layers, pooler.

    Prepends the soft prompt (`model`'s "prompt" param), runs `encoder`, drops the prompt
    positions (heads see the real tokens only: the first token is first again) and pools
    the first token through `model`'s Dense "pooler". Call it inside `model`'s compact
    __call__, so that every param, module and dropout stream is `model`'s own.

    Args:
      model: the calling encoder model.
      x: the embedded tokens [B, L, E].
      attention_mask: [B, L], 1 for real tokens.
      encoder: the layers, called as encoder(x, bias, train=train).
      train: dropout on.
      activation: applied to the pooler's output.
      pooler_dropout: dropout on the first token before the pooler; None: none.
      project: applied to the prompted embeddings before the layers (e.g. to widen them).
      bias: the prompted attention mask [B, L'] -> the additive attention bias.

    Returns:
      (sequence_output [B, L, H], pooled [B, H]).
    """
    cfg, peft = model.config, model.peft
    x, attention_mask = prepend_prompt(model, x, attention_mask, peft, cfg.initializer_range)
    if project is not None:
        x = project(x)
    x = encoder(x, bias(attention_mask), train=train)[:, peft.prompt_tokens:]
    first = x[:, 0]
    if pooler_dropout is not None:
        first = Dropout(pooler_dropout, deterministic=not train)(first)
    return x, activation(normal_dense(cfg, cfg.hidden_size, "pooler", model.dtype, peft)(first, train=train))


class BertModel(TextEncoder):
    """BERT: embeddings, post-LN transformer encoder and the [CLS] pooler (config: BertConfig)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, H], pooled_output [B, H])."""
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        check_positions(input_ids.shape[-1], cfg.max_position_embeddings)
        dropout = hidden_dropout(self)
        x = Embeddings(cfg, dropout, self.dtype, name="embeddings")(input_ids, token_type_ids, train=train)
        encoder = Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")
        return encode(self, x, attention_mask, encoder, train=train, activation=jnp.tanh)


def encoder_of(model_class: type[TextEncoder]) -> Callable[[Any, EncoderOptions, str], TextEncoder]:
    """FamilySpec.encoder for a TextEncoder subclass: (config, EncoderOptions, name) -> the model."""
    def build(cfg: Any, opts: EncoderOptions, name: str) -> TextEncoder:
        return model_class(cfg, dtype=opts.dtype, dropout_override=opts.dropout, peft=opts.peft, name=name)
    return build


def pooler_export(architecture: str, model_type: str, classifies: str) -> HFExport:
    """The HF export of a text family whose HF classifier reads the encoder's pooler.

    Args:
      architecture: the transformers class name.
      model_type: config.json "model_type".
      classifies: what the HF class classifies, for the message of a run that cannot
        be exported.

    Returns:
      An HFExport whose check refuses runs that did not pool with the pooler.
    """
    def check(meta: dict) -> None:
        if meta.get("pooling") != "pooler":
            raise UserError(f"this run pools with {meta.get('pooling')!r}; HF's {architecture} classifies "
                            f"{classifies}, so its logits would differ: fine-tune with "
                            "--config.model.pooling=pooler to export")
    return HFExport(architecture, model_type, check)


FAMILY = FamilySpec(
    name="bert", model_types=("bert",), modality="text", config_class=BertConfig, encoder=encoder_of(BertModel),
    layout=lambda cfg: bert_layout(cfg.num_hidden_layers), converter="ftjax.convert.bert",
    variants={"tiny": TINY_BERT}, provides=("attention",),
    optional=(r".*/pooler/.*",),  # sentence-transformers exports (ONNX MiniLM-L3) ship no pooler
    hf_export=pooler_export("BertForSequenceClassification", "bert", "the [CLS] pooler output"))
