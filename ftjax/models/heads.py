"""Task heads on top of an encoder: sequence and image classification (and regression)."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from ftjax.models import bert
from ftjax.models.layers import Peft

POOLINGS = ("pooler", "cls", "mean")
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
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
    input_keys: ClassVar[tuple[str, ...]] = TEXT_INPUT_KEYS

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


# family -> (module, encoder class); imported on first use.
IMAGE_ENCODERS = {"vit": ("ftjax.models.vit", "ViTModel"),
                  "resnet": ("ftjax.models.resnet", "ResNetModel"),
                  "efficientnet": ("ftjax.models.efficientnet", "EfficientNet")}


def image_encoder_class(family: str):
    module, name = IMAGE_ENCODERS[family]
    return getattr(importlib.import_module(module), name)


class ImageClassifier(nn.Module):
    """image encoder -> feature vector -> dropout -> Dense(num_labels) named "head".

    The head starts at zero, as in big_vision and vit_jax fine-tuning: the first
    steps then move the head only where the gradient points, not a random projection.

    Attributes:
      family: key of IMAGE_ENCODERS; the encoder's params live under this name.
      encoder_config: the encoder's config dataclass.
      num_labels: classes; 1 means regression.
      head_dropout: dropout before the head.
      dropout: overrides the encoder's dropout when set (ViT hidden dropout, CNN
        stochastic depth / classifier dropout where the family has it).
      update_batch_stats: CNNs: train steps use and update batch statistics; else
        the stored statistics are used and kept (the default; right for small batches).
      image_size: ViT: the input resolution its position embeddings are made for.
    """

    family: str
    encoder_config: Any
    num_labels: int
    head_dropout: float = 0.0
    dropout: float | None = None
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    update_batch_stats: bool = False
    image_size: int | None = None
    input_keys: ClassVar[tuple[str, ...]] = ("image",)

    @nn.compact
    def __call__(self, image, *, train: bool = False):
        """image: float32 NHWC, normalised. Returns float32 logits [B, num_labels]."""
        kwargs: dict[str, Any] = {"dtype": self.dtype, "peft": self.peft, "name": self.family}
        if self.family == "vit":
            kwargs.update(image_size=self.image_size, dropout_override=self.dropout)
        else:
            kwargs.update(update_batch_stats=self.update_batch_stats)
        features = image_encoder_class(self.family)(self.encoder_config, **kwargs)(image, train=train)
        x = nn.Dropout(self.head_dropout, deterministic=not train)(features)
        logits = nn.Dense(self.num_labels, name="head", dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.zeros)(x)
        return logits.astype(jnp.float32)
