"""Model registry: encoder families, their configs, tiny variants and the classifier."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models import bert, heads
from ftjax.models.layers import Peft

# Small enough that a train step compiles in about a second on a CPU.
TINY_BERT = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
    "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "model_type": "bert",
}
VARIANTS = {("bert", "tiny"): TINY_BERT}
_CONFIG_CLASSES = {"bert": bert.BertConfig}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_hf_config(model_dir: str | pathlib.Path) -> dict[str, Any]:
    """Reads `config.json` of an HF-layout folder."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json (expected an HF snapshot folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def variant_config(family: str, variant: str) -> dict[str, Any]:
    """The HF-style config dict of a named variant such as ("bert", "tiny")."""
    if (family, variant) not in VARIANTS:
        known = ", ".join(f"{f}/{v}" for f, v in VARIANTS)
        raise UserError(f"unknown model variant {family}/{variant}; known: {known}")
    return dict(VARIANTS[(family, variant)])


def create_classifier(family: str, hf_config: dict[str, Any], *, num_labels: int, pooling: str = "pooler",
                      dropout: float | None = None, head_dropout: float | None = None,
                      dtype: str = "float32", peft: Peft = Peft()) -> heads.SequenceClassifier:
    """A sequence classifier (or regressor, num_labels=1) over an encoder family.

    Args:
      family: encoder family ("bert").
      hf_config: the encoder's config.json dict.
      num_labels: classes, or 1 for regression.
      pooling: "pooler", "cls" or "mean".
      dropout: encoder hidden dropout; None keeps the config's.
      head_dropout: dropout before the head; None uses the encoder's hidden dropout.
      dtype: compute dtype name, "float32" or "bfloat16".
      peft: model-side options of the fine-tuning method (e.g. LoRA).

    Returns:
      The Linen module; params are {family: ..., "head": {"kernel", "bias"}}.
    """
    if family not in _CONFIG_CLASSES:
        raise UserError(f"unknown model family {family!r}; known: {', '.join(_CONFIG_CLASSES)}")
    if pooling not in heads.POOLINGS:
        raise UserError(f"config.model.pooling={pooling!r} is not one of {', '.join(heads.POOLINGS)}")
    if dtype not in _DTYPES:
        raise UserError(f"config.model.dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    cfg = _CONFIG_CLASSES[family].from_hf(hf_config)
    hidden_dropout = cfg.hidden_dropout_prob if dropout is None else dropout
    return heads.SequenceClassifier(
        family=family, encoder_config=cfg, num_labels=num_labels, pooling=pooling, dropout=dropout,
        head_dropout=hidden_dropout if head_dropout is None else head_dropout,
        initializer_range=cfg.initializer_range, dtype=_DTYPES[dtype], peft=peft)
