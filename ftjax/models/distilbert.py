"""DistilBERT encoder in Flax Linen, built from an HF `config.json` (model_type "distilbert").

DistilBERT is BERT with half the layers, no token-type embeddings and no pooler. Its
transformer block is BERT's post-LN block, so the layers are `bert.Encoder`'s; only the
embeddings and the classification pre-layer differ. HF's
DistilBertForSequenceClassification classifies relu(pre_classifier(first token)) after
a `seq_classif_dropout` dropout: here the pre-classifier is the encoder's "pooler"
(ReLU), the final projection the task's "head", and the family's head dropout is
`seq_classif_dropout`.

Parameter paths (methods and optimizer rules target these by regex):
  embeddings/{word,position}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}
  encoder/layer_{i}/attention_LayerNorm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/output_LayerNorm/{scale,bias}
  pooler/{kernel,bias}   (HF pre_classifier)

Training differs from HF in one detail: `bert.Layer` applies the hidden dropout to the
attention output before its residual LayerNorm, which DistilBERT does not. Evaluation
(dropout off) is identical.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError
from ftjax.models import bert
from ftjax.models.family import FamilySpec
from ftjax.models.layers import ACTIVATIONS, Dropout, check_heads, config_from_hf
from ftjax.models.layout import bert_layout

# DistilBERT fixes every LayerNorm epsilon in code; config.json has no field for it.
LAYER_NORM_EPS = 1e-12

# Small enough that a train step compiles in about a second on a CPU; vocab_size covers
# the test tokenizers' ~32 ids.
TINY_DISTILBERT = {
    "vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "activation": "gelu",
    "max_position_embeddings": 64, "dropout": 0.1, "attention_dropout": 0.1, "seq_classif_dropout": 0.2,
    "sinusoidal_pos_embds": False, "initializer_range": 0.02, "pad_token_id": 0, "model_type": "distilbert",
}
# distilbert-base-uncased's shape.
BASE_DISTILBERT = {
    "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072, "activation": "gelu",
    "max_position_embeddings": 512, "dropout": 0.1, "attention_dropout": 0.1, "seq_classif_dropout": 0.2,
    "sinusoidal_pos_embds": False, "initializer_range": 0.02, "pad_token_id": 0, "model_type": "distilbert",
}


def _bert_name(field: str) -> property:
    """A read-only property: BERT's name for DistilBERT's config field `field`."""
    return property(operator.attrgetter(field), doc=f"BERT's name for `{field}`.")


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """The HF DistilBertConfig fields ftjax uses (same names).

    The read-only properties give the BERT names that `bert.Layer`, `bert.Encoder`,
    `SelfAttention` and `PrefixEncoder` read, so the shared blocks take this config as is.
    """

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    seq_classif_dropout: float = 0.2
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DistilBertConfig:
        """Builds the config from a config.json dict, ignoring unrelated keys.

        Args:
          hf: the config.json dict (HF DistilBERT names: dim, n_layers, n_heads, ...).

        Returns:
          The config.
        """
        act = hf.get("activation")
        if act is not None and act not in ACTIVATIONS:
            raise UserError(f"activation={act!r} is not supported for DistilBERT ({', '.join(ACTIVATIONS)})")
        cfg = config_from_hf(cls, hf)
        check_heads(cfg.dim, cfg.n_heads, "dim", "n_heads")
        return cfg

    # BERT's names for the same quantities (read by the shared bert/layers modules).
    hidden_size = _bert_name("dim")
    num_hidden_layers = _bert_name("n_layers")
    num_attention_heads = _bert_name("n_heads")
    intermediate_size = _bert_name("hidden_dim")
    hidden_act = _bert_name("activation")
    hidden_dropout_prob = _bert_name("dropout")
    attention_probs_dropout_prob = _bert_name("attention_dropout")

    @property
    def layer_norm_eps(self) -> float:
        return LAYER_NORM_EPS


def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """The fixed sine/cosine position table DistilBERT starts from when `sinusoidal_pos_embds` is set.

    Column pair (2i, 2i + 1) holds sin and cos of pos / 10000^(2i / dim).

    Args:
      n_pos: positions (rows).
      dim: embedding width (columns).

    Returns:
      float32 [n_pos, dim].
    """
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    rate = np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)
    angle = pos / rate[None]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(np.float32)


class Embeddings(nn.Module):
    """Word + position embeddings, LayerNorm, dropout (no token types)."""

    config: DistilBertConfig
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, *, train: bool):
        cfg = self.config
        normal = nn.initializers.normal(cfg.initializer_range)

        def word_init(key, shape, dtype=jnp.float32):
            # the padding row starts at zero, as HF's nn.Embedding(padding_idx=...) does
            table = normal(key, shape, dtype)
            return table.at[cfg.pad_token_id].set(0) if 0 <= cfg.pad_token_id < shape[0] else table

        def position_init(key, shape, dtype=jnp.float32):
            if cfg.sinusoidal_pos_embds:
                return jnp.asarray(sinusoidal_table(*shape), dtype)
            return normal(key, shape, dtype)

        words = nn.Embed(cfg.vocab_size, cfg.dim, name="word_embeddings", embedding_init=word_init,
                         dtype=self.dtype, param_dtype=jnp.float32)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.dim, name="position_embeddings",
                             embedding_init=position_init, dtype=self.dtype, param_dtype=jnp.float32)
        x = words(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None])
        x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="LayerNorm", dtype=self.dtype, param_dtype=jnp.float32)(x)
        return Dropout(self.dropout, deterministic=not train)(x)


class DistilBertModel(bert.TextEncoder):
    """DistilBERT: embeddings, BERT's post-LN layers, and HF's pre-classifier as a ReLU "pooler".

    `config` is a DistilBertConfig; `dropout_override` replaces `config.dropout`.
    """

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, dim], pooled [B, dim]); `token_type_ids` is ignored.

        Args:
          input_ids: int [B, L] token ids.
          attention_mask: [B, L], 1 for real tokens, 0 for padding.
          token_type_ids: accepted for the shared text-encoder call, unused: DistilBERT
            has no segment embeddings.
          train: dropout on.
        """
        del token_type_ids
        cfg = self.config
        if input_ids.shape[-1] > cfg.max_position_embeddings:
            raise UserError(f"sequence length {input_ids.shape[-1]} exceeds DistilBERT's max_position_embeddings "
                            f"{cfg.max_position_embeddings}: lower config.data.max_length")
        dropout = bert.hidden_dropout(self)
        x = Embeddings(cfg, dropout, self.dtype, name="embeddings")(input_ids, train=train)
        encoder = bert.Encoder(cfg, dropout, cfg.attention_dropout, self.dtype, self.peft,
                               attention_residual_dropout=False, name="encoder")
        return bert.encode(self, x, attention_mask, encoder, train=train, activation=jax.nn.relu)


FAMILY = FamilySpec(
    name="distilbert", model_types=("distilbert",), modality="text", config_class=DistilBertConfig,
    encoder=bert.encoder_of(DistilBertModel), layout=lambda cfg: bert_layout(cfg.n_layers),
    converter="ftjax.convert.distilbert",
    variants={"tiny": TINY_DISTILBERT, "base": BASE_DISTILBERT}, provides=("attention",),
    optional=(r".*/pooler/.*",),  # DistilBertModel and masked-LM checkpoints have no pre_classifier
    hf_export=bert.pooler_export("DistilBertForSequenceClassification", "distilbert",
                                 "relu(pre_classifier(first token))"),
    head_dropout=lambda cfg: cfg.seq_classif_dropout)
