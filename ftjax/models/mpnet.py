"""MPNet encoder in Flax Linen, built from an HF `config.json` (model_type "mpnet").

MPNet's transformer block is BERT's post-LN block, so the layers are `bert.Encoder`'s.
What differs from BERT:
  * the embeddings have no token types (token_type_ids are accepted and ignored) and
    number positions as RoBERTa does: from padding_idx + 1, padding tokens skipped;
  * a relative position bias: one learned scalar per (bucket of the distance key -
    query, head), computed once and added to the attention scores of every layer. It
    travels inside the additive bias `bert.Encoder` hands to each layer, beside the
    padding bias; deep-prefix keys get a zero bias there (they have no position).
HF's MPNetForSequenceClassification classifies out_proj(tanh(dense(first token))): here
`dense` is the encoder's "pooler" (as MPNetModel's own pooler) and `out_proj` the
task's "head".

Parameter paths (methods and optimizer rules target these by regex):
  embeddings/{word,position}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  relative_attention_bias/embedding   [relative_attention_num_buckets, num_attention_heads]
  encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}
  encoder/layer_{i}/attention_LayerNorm/{scale,bias}
  encoder/layer_{i}/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/output_LayerNorm/{scale,bias}
  pooler/{kernel,bias}

Training differs from HF in one detail: HF's classification head also drops out the
first token before its dense layer. Evaluation (dropout off) is identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError
from ftjax.models import bert
from ftjax.models.family import FamilySpec
from ftjax.models.layers import check_heads, config_from_hf, padding_bias
from ftjax.models.layout import Layout

# HF's MPNet fixes these in code, whatever config.json says: the padding id that
# position numbering skips, and the bucketing of relative distances (32 buckets, log
# spaced up to distance 128), which uses the first 32 rows of the bias table.
PADDING_IDX = 1
NUM_BUCKETS = 32
MAX_DISTANCE = 128

# Small enough that a train step compiles in about a second on a CPU; vocab_size covers
# the test tokenizers' ~32 ids.
TINY_MPNET = {
    "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 66,
    "relative_attention_num_buckets": 32, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-5, "initializer_range": 0.02, "pad_token_id": 1, "model_type": "mpnet",
}
# microsoft/mpnet-base's shape (all-mpnet-base-v2 has the same).
BASE_MPNET = {
    "vocab_size": 30527, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514,
    "relative_attention_num_buckets": 32, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-5, "initializer_range": 0.02, "pad_token_id": 1, "model_type": "mpnet",
}


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
    """The HF MPNetConfig fields ftjax uses (same names and defaults).

    `pad_token_id` is informational: HF numbers positions around id 1 whatever it says
    (PADDING_IDX), and so does ftjax.
    """

    vocab_size: int = 30527
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    relative_attention_num_buckets: int = 32
    pad_token_id: int = 1

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> MPNetConfig:
        """Builds the config from a config.json dict, ignoring unrelated keys.

        Raises:
          UserError: heads do not divide hidden_size, or the bias table has fewer rows
            than the 32 buckets MPNet uses.
        """
        cfg = config_from_hf(cls, hf)
        check_heads(cfg.hidden_size, cfg.num_attention_heads)
        if cfg.relative_attention_num_buckets < NUM_BUCKETS:
            raise UserError(f"relative_attention_num_buckets={cfg.relative_attention_num_buckets}: MPNet "
                            f"buckets relative distances into {NUM_BUCKETS}, so it must be at least {NUM_BUCKETS}")
        if cfg.max_position_embeddings < PADDING_IDX + 2:
            raise UserError(f"max_position_embeddings={cfg.max_position_embeddings} leaves no position for "
                            f"tokens (MPNet numbers them from {PADDING_IDX + 1})")
        return cfg


def relative_position_buckets(q_len: int, k_len: int) -> np.ndarray:
    """The bucket [Q, K] of every (query, key) distance, as HF's MPNet buckets them.

    Half the buckets hold keys before or at the query, half keys after it; in each half
    the first 8 are exact distances 0..7 and the other 8 log-spaced up to distance 128
    (farther shares the last). Computed in float32 numpy, with the same rounding as the
    PyTorch reference, at trace time (the lengths are static), so every backend agrees.

    Args:
      q_len: query positions.
      k_len: key positions.

    Returns:
      int32 [q_len, k_len] bucket indices in [0, 32).
    """
    distance = np.arange(q_len)[:, None] - np.arange(k_len)[None, :]  # query - key
    half = NUM_BUCKETS // 2
    exact = half // 2
    after = (distance < 0).astype(np.int64) * half  # keys after the query use the upper half
    n = np.abs(distance)
    scaled = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(MAX_DISTANCE / exact)) * np.float32(half - exact))
    far = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (after + np.where(n < exact, n, far)).astype(np.int32)


def position_ids(input_ids):
    """RoBERTa-style positions: real tokens count from PADDING_IDX + 1, padding stays at PADDING_IDX."""
    real = (input_ids != PADDING_IDX).astype(jnp.int32)
    return jnp.cumsum(real, axis=-1) * real + PADDING_IDX


class MPNetModel(bert.TextEncoder):
    """MPNet: embeddings, BERT's post-LN encoder with a shared relative position bias, a pooler (MPNetConfig)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, H], pooled_output [B, H]); token_type_ids are ignored."""
        del token_type_ids  # MPNet has no segment embeddings
        cfg = self.config
        length = input_ids.shape[-1]
        if length + PADDING_IDX > cfg.max_position_embeddings - 1:
            raise UserError(f"sequence length {length} needs positions up to {length + PADDING_IDX}, beyond "
                            f"max_position_embeddings {cfg.max_position_embeddings}: use a max_length of at "
                            f"most {cfg.max_position_embeddings - PADDING_IDX - 1}")
        dropout = bert.hidden_dropout(self)
        x = bert.Embeddings(cfg, dropout, self.dtype, name="embeddings")(  # no token-type table
            input_ids, None, train=train, positions=position_ids(input_ids))

        def bias(attention_mask):
            # One bias for every layer, over the whole sequence (soft prompt included: the real
            # tokens keep their distances to each other).
            total = attention_mask.shape[1]
            table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_attention_heads,
                             name="relative_attention_bias", param_dtype=jnp.float32, dtype=jnp.float32,
                             embedding_init=nn.initializers.normal(cfg.initializer_range))
            relative = table(jnp.asarray(relative_position_buckets(total, total)))  # [Q, K, H]
            return padding_bias(attention_mask) + jnp.transpose(relative, (2, 0, 1))[None]  # [B, H, Q, K]

        encoder = bert.Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")
        return bert.encode(self, x, attention_mask, encoder, train=train, activation=jnp.tanh, bias=bias)


def mpnet_layout(cfg: MPNetConfig) -> Layout:
    """BERT's groups, with the shared relative position bias in the stem beside the embeddings."""
    return Layout(groups=(r".*/(embeddings|relative_attention_bias)/.*",)
                  + tuple(rf".*/layer_{i}/.*" for i in range(cfg.num_hidden_layers)),
                  top=(r".*/pooler/.*",), norms=r".*LayerNorm.*")


FAMILY = FamilySpec(
    name="mpnet", model_types=("mpnet",), modality="text", config_class=MPNetConfig,
    encoder=bert.encoder_of(MPNetModel),
    layout=mpnet_layout, converter="ftjax.convert.mpnet",
    variants={"tiny": TINY_MPNET, "base": BASE_MPNET}, provides=("attention",),
    optional=(r".*/pooler/.*",),  # masked-LM checkpoints (microsoft/mpnet-base) ship no pooler
    hf_export=bert.pooler_export("MPNetForSequenceClassification", "mpnet", "tanh(dense(first token))"))
