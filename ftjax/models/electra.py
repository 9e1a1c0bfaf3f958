"""ELECTRA discriminator encoder in Flax Linen, built from an HF `config.json`.

ELECTRA (Clark et al. 2020) is BERT's post-LN encoder behind narrower embeddings: the
word, position and token-type tables and their LayerNorm are `embedding_size` wide, and
when that differs from `hidden_size` a Dense `embeddings_project` lifts them to the
encoder's width. Discriminator checkpoints ship no pooler; HF's ElectraForSequenceClassification
classifies the first token through dense -> gelu -> out_proj, so here the dense is the
"pooler" (with gelu, not BERT's tanh) and out_proj is the task head.

Parameter paths (methods and optimizer rules target these by regex):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/LayerNorm/{scale,bias}
  embeddings_project/{kernel,bias}                (only when embedding_size != hidden_size)
  encoder/layer_{i}/...                           (bert.Layer: attention/{query,key,value,out}, ...)
  pooler/{kernel,bias}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models import bert
from ftjax.models.family import FamilySpec
from ftjax.models.layers import gelu, normal_dense
from ftjax.models.layout import Layout

# vocab >= 40 so the test tokenizer's ids fit; embedding_size != hidden_size so the
# projection is part of every tiny model.
TINY_ELECTRA = {
    "vocab_size": 128, "embedding_size": 16, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
    "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "model_type": "electra",
}
# google/electra-small-discriminator and google/electra-base-discriminator.
SMALL_ELECTRA = {
    "vocab_size": 30522, "embedding_size": 128, "hidden_size": 256, "num_hidden_layers": 12,
    "num_attention_heads": 4, "intermediate_size": 1024, "hidden_act": "gelu", "max_position_embeddings": 512,
    "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "model_type": "electra",
}
BASE_ELECTRA = dict(SMALL_ELECTRA, embedding_size=768, hidden_size=768, num_attention_heads=12,
                    intermediate_size=3072)


@dataclasses.dataclass(frozen=True)
class ElectraConfig(bert.BertConfig):
    """The HF ElectraConfig fields ftjax uses (same names and defaults).

    Attributes beyond BertConfig:
      embedding_size: width of the embedding tables (projected to hidden_size when it differs).
      classifier_dropout: dropout before the pooler and before the task head (unless
        config.model.head_dropout says otherwise); None: the encoder's hidden dropout.
    """

    embedding_size: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    classifier_dropout: float | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ElectraConfig:
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        cfg = super().from_hf(hf)
        if cfg.embedding_size < 1:
            raise UserError(f"embedding_size={cfg.embedding_size} must be >= 1")
        return cfg


def electra_layout(num_layers: int) -> Layout:
    """BERT's layout with the embeddings projection counted in the embeddings group.

    freeze_bottom_k, gradual unfreezing and layer-wise lr decay then treat
    `embeddings_project` as part of the input stem, where it belongs.
    """
    return Layout(groups=(r".*/embeddings(_project)?/.*",) + tuple(rf".*/layer_{i}/.*" for i in range(num_layers)),
                  top=(r".*/pooler/.*",), norms=r".*LayerNorm.*")


class ElectraModel(bert.TextEncoder):
    """ELECTRA discriminator: embeddings (+ projection), BERT layers, first-token gelu pooler (ElectraConfig)."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns (sequence_output [B, L, hidden], pooled [B, hidden]): pooled = gelu(pooler(first token))."""
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        bert.check_positions(input_ids.shape[-1], cfg.max_position_embeddings)
        dropout = bert.hidden_dropout(self)
        # bert.Embeddings builds its tables at the config's hidden_size: give it the embedding width.
        narrow = dataclasses.replace(cfg, hidden_size=cfg.embedding_size)
        x = bert.Embeddings(narrow, dropout, self.dtype, name="embeddings")(input_ids, token_type_ids, train=train)

        def project(h):
            # after the prompt: it lives in the embedding space, so that prompt tuning's
            # vocabulary init (rows of word_embeddings) has the right width
            return normal_dense(cfg, cfg.hidden_size, "embeddings_project", self.dtype, self.peft)(h, train=train)

        encoder = bert.Encoder(cfg, dropout, cfg.attention_probs_dropout_prob, self.dtype, self.peft, name="encoder")
        # HF's classification head: dropout, dense, gelu (exact erf form, as HF's "gelu"); its
        # second dropout and out_proj are the task's head dropout and Dense head. HF's first
        # dropout is classifier_dropout, else the hidden dropout (here: after model.dropout).
        head_dropout = dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        return bert.encode(self, x, attention_mask, encoder, train=train,
                           project=project if cfg.embedding_size != cfg.hidden_size else None,
                           pooler_dropout=head_dropout, activation=gelu)


FAMILY = FamilySpec(
    name="electra", model_types=("electra",), modality="text", config_class=ElectraConfig,
    encoder=bert.encoder_of(ElectraModel),
    layout=lambda cfg: electra_layout(cfg.num_hidden_layers), converter="ftjax.convert.electra",
    variants={"tiny": TINY_ELECTRA, "small": SMALL_ELECTRA, "base": BASE_ELECTRA}, provides=("attention",),
    # Discriminator checkpoints (google/electra-*-discriminator) carry no classification head.
    optional=(r".*/pooler/.*",),
    # HF's classification head drops classifier_dropout (else the hidden dropout) before both of its layers
    head_dropout=lambda cfg: cfg.classifier_dropout,
    hf_export=bert.pooler_export("ElectraForSequenceClassification", "electra",
                                 "the first token through its dense + gelu head (ftjax's pooler)"))
