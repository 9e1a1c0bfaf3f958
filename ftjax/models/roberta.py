"""RoBERTa and XLM-RoBERTa encoders in Flax Linen, HF RobertaModel semantics.

RoBERTa is BERT's post-LN transformer with two differences in the embeddings:
positions count real tokens only and start after the padding id (fairseq's scheme), and
checkpoints keep a single token-type row. The layers are `bert.Layer` / `bert.Encoder`,
so every fine-tuning method's hooks (LoRA, IA3, adapters, prompts, prefixes) carry over.

The classifier's pre-layer, tanh(dense(<s>)), is the `pooler`: HF's
RobertaForSequenceClassification head is classifier.dense (-> pooler) and
classifier.out_proj (-> the task's "head"), so pooling="pooler" gives HF's logits.

Parameter paths (the classifier creates the encoder under "roberta"):
  roberta/embeddings/{word,position,token_type}_embeddings/embedding, roberta/embeddings/LayerNorm/{scale,bias}
  roberta/encoder/layer_{i}/...   (as BERT's: attention/{query,key,value,out}, attention_LayerNorm,
                                   intermediate, output, output_LayerNorm)
  roberta/pooler/{kernel,bias}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models import bert
from ftjax.models.family import FamilySpec
from ftjax.models.layout import bert_layout

# max_position_embeddings 64: 16 tokens need positions up to 16 + pad_token_id; the rest
# is headroom for longer test inputs.
TINY_ROBERTA = {
    "model_type": "roberta", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
    "type_vocab_size": 1, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-5, "initializer_range": 0.02, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}


def _roberta(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    """The config.json of a published RoBERTa size (roberta-base / roberta-large)."""
    return {**TINY_ROBERTA, "vocab_size": 50265, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": intermediate, "max_position_embeddings": 514}


@dataclasses.dataclass(frozen=True)
class RobertaConfig(bert.BertConfig):
    """The HF RobertaConfig / XLMRobertaConfig fields ftjax uses: BertConfig's (same names).

    The defaults are transformers' class defaults, which apply to a config.json that
    leaves a field out; published checkpoints set max_position_embeddings 514,
    type_vocab_size 1 and layer_norm_eps 1e-5 explicitly.
    """

    vocab_size: int = 50265
    pad_token_id: int = 1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> RobertaConfig:
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        cfg = super().from_hf(hf)
        if not 0 <= cfg.pad_token_id < min(cfg.vocab_size, cfg.max_position_embeddings - 1):
            raise UserError(f"pad_token_id {cfg.pad_token_id} must be a token id below vocab_size "
                            f"{cfg.vocab_size} and leave room for positions below max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
        return cfg

    @property
    def max_length(self) -> int:
        """The longest input: positions run from pad_token_id + 1 up to max_position_embeddings - 1."""
        return self.max_position_embeddings - self.pad_token_id - 1


def position_ids(input_ids, pad_token_id: int):
    """RoBERTa's position ids [B, L]: real tokens count 1, 2, ... after the padding id; padding gets it.

    Padding is told by the token id, not the attention mask, as in fairseq and
    transformers, so left padding shifts no real token's position.
    """
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


class RobertaModel(bert.TextEncoder):
    """RoBERTa: embeddings with padding-aware positions, BERT's post-LN layers, the <s> pooler (RobertaConfig)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, H], pooled_output [B, H]).

        Raises:
          UserError: the inputs are longer than the position table allows.
        """
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_length:
            # Out-of-range positions would silently read NaNs (jnp.take) instead of failing.
            raise UserError(f"sequence length {length} is longer than this RoBERTa model takes: {cfg.max_length} "
                            f"tokens (max_position_embeddings {cfg.max_position_embeddings} - pad_token_id "
                            f"{cfg.pad_token_id} - 1, since positions start after the padding id); "
                            f"set data.max_length <= {cfg.max_length}")
        if token_type_ids is None or cfg.type_vocab_size == 1:
            # One segment row: a pair's second-segment ids from a BERT-style tokenizer would
            # index past it (and read NaNs under jnp.take); every token takes the one row.
            token_type_ids = jnp.zeros_like(input_ids)
        dropout = bert.hidden_dropout(self)
        x = bert.Embeddings(cfg, dropout, self.dtype, name="embeddings")(
            input_ids, token_type_ids, train=train, positions=position_ids(input_ids, cfg.pad_token_id))
        # The prompt is prepended after the embeddings: it takes no position, so it does not
        # count against max_length.
        encoder = bert.Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")
        return bert.encode(self, x, attention_mask, encoder, train=train, activation=jnp.tanh)


FAMILY = FamilySpec(
    name="roberta", model_types=("roberta", "xlm-roberta"), modality="text", config_class=RobertaConfig,
    encoder=bert.encoder_of(RobertaModel), layout=lambda cfg: bert_layout(cfg.num_hidden_layers),
    converter="ftjax.convert.roberta",
    variants={"tiny": TINY_ROBERTA, "base": _roberta(768, 12, 12, 3072), "large": _roberta(1024, 24, 16, 4096)},
    provides=("attention",),
    optional=(r".*/pooler/.*",),  # masked-LM checkpoints (roberta-base, xlm-roberta-base) ship no pooler
    hf_export=bert.pooler_export("RobertaForSequenceClassification", "roberta", "tanh(dense(<s>)), ftjax's pooler"))
