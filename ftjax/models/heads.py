"""Task heads on top of an encoder: sequence classification and regression."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.models import bert
from ftjax.models.layers import Peft

POOLINGS = ("pooler", "cls", "mean")
# family -> encoder module; the module is created under the family's name ("bert/...").
ENCODERS = {"bert": bert.BertModel}


class SequenceClassifier(nn.Module):
    """encoder -> pooled vector -> dropout -> Dense(num_labels) named "head".

    Attributes:
      family: key of ENCODERS; the encoder's params live under this name.
      encoder_config: the encoder's config (e.g. bert.BertConfig).
      dropout: overrides the encoder's hidden dropout when set.
      num_labels: classes; 1 means regression.
      pooling: "pooler" (the encoder's pooler, as HF's ForSequenceClassification),
        "cls" (the raw first token) or "mean" (masked mean over tokens).
      head_dropout: dropout before the head.
      initializer_range: stddev of the head's normal init.
    """

    family: str
    encoder_config: Any
    num_labels: int
    dropout: float | None = None
    pooling: str = "pooler"
    head_dropout: float = 0.1
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False):
        """Returns float32 logits [B, num_labels]."""
        encoder = ENCODERS[self.family](self.encoder_config, dtype=self.dtype,
                                        dropout_override=self.dropout, peft=self.peft, name=self.family)
        seq, pooled = encoder(input_ids, attention_mask, token_type_ids, train=train)
        if self.pooling == "cls":
            pooled = seq[:, 0]
        elif self.pooling == "mean":
            m = attention_mask[..., None].astype(seq.dtype)
            pooled = (seq * m).sum(1) / jnp.maximum(m.sum(1), 1)
        x = nn.Dropout(self.head_dropout, deterministic=not train)(pooled)
        logits = nn.Dense(self.num_labels, name="head", dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(self.initializer_range))(x)
        return logits.astype(jnp.float32)
