"""Model registry: encoder families, their configs, tiny variants, layouts and classifiers."""

from __future__ import annotations

import importlib
import json
import pathlib
from typing import Any

import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models import bert, heads
from ftjax.models.layers import Peft
from ftjax.models.layout import Layout, bert_layout

# Small enough that a train step compiles in about a second on a CPU.
TINY_BERT = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 64,
    "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "model_type": "bert",
}
VARIANTS = {("bert", "tiny"): TINY_BERT}
_CONFIG_CLASSES = {"bert": bert.BertConfig}
TEXT_FAMILIES = ("bert",)
# family -> module defining its config class, VARIANTS and layout (imported on first use)
IMAGE_FAMILIES = {"vit": "ftjax.models.vit", "resnet": "ftjax.models.resnet",
                  "efficientnet": "ftjax.models.efficientnet"}
FAMILIES = TEXT_FAMILIES + tuple(IMAGE_FAMILIES)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def modality(family: str) -> str:
    """"text" or "image"."""
    _check_family(family)
    return "text" if family in TEXT_FAMILIES else "image"


def _image_module(family: str):
    return importlib.import_module(IMAGE_FAMILIES[family])


def layout(family: str, hf_config: dict[str, Any]) -> Layout:
    """The family's depth groups (see ftjax.models.layout) for this config."""
    _check_family(family)
    if family == "bert":
        return bert_layout(int(hf_config["num_hidden_layers"]))
    return _image_module(family).layout(_image_module(family).config_from_hf(hf_config))
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_hf_config(model_dir: str | pathlib.Path, family: str = "bert", variant: str | None = None
                   ) -> dict[str, Any]:
    """Reads `config.json` of an HF-layout folder.

    A folder without one (the EfficientNet-Lite .pth asset) takes the config of the
    named `variant` of `family` instead.
    """
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        if variant and modality(family) == "image":
            return variant_config(family, variant)
        raise UserError(f"{model_dir} has no config.json (expected an HF snapshot folder"
                        + ("; or set config.model.variant" if modality(family) == "image" else "") + ")")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def variant_config(family: str, variant: str) -> dict[str, Any]:
    """The HF-style config dict of a named variant such as ("bert", "tiny") or ("vit", "b16")."""
    _check_family(family)
    variants = dict(VARIANTS)
    for f in IMAGE_FAMILIES:
        if f == family:
            variants.update({(f, v): c for v, c in _image_module(f).VARIANTS.items()})
    if (family, variant) not in variants:
        known = ", ".join(f"{f}/{v}" for f, v in variants if f == family)
        raise UserError(f"unknown model variant {family}/{variant}; known: {known}")
    return dict(variants[(family, variant)])


def create_classifier(family: str, hf_config: dict[str, Any], *, num_labels: int, pooling: str = "pooler",
                      dropout: float | None = None, head_dropout: float | None = None,
                      dtype: str = "float32", peft: Peft = Peft(), update_batch_stats: bool = False,
                      image_size: int | None = None):
    """A classifier (or regressor, num_labels=1) over an encoder family.

    Args:
      family: encoder family ("bert", "vit", "resnet", "efficientnet").
      hf_config: the encoder's config.json dict.
      num_labels: classes, or 1 for regression.
      pooling: text: "pooler", "cls" or "mean" (image encoders pool their own way).
      dropout: encoder dropout; None keeps the config's.
      head_dropout: dropout before the head; None: the encoder's hidden dropout (text),
        0 (images).
      dtype: compute dtype name, "float32" or "bfloat16".
      peft: model-side options of the fine-tuning method (e.g. LoRA).
      update_batch_stats: BatchNorm encoders: train with batch statistics and update them.
      image_size: image encoders: the input resolution (ViT position embeddings).

    Returns:
      The Linen module; params are {family: ..., "head": {"kernel", "bias"}}.
    """
    _check_family(family)
    if dtype not in _DTYPES:
        raise UserError(f"config.model.dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    if modality(family) == "image":
        mod = _image_module(family)
        if (peft.prefix_tokens or peft.prompt_tokens or peft.lora_rank or peft.ia3 or peft.adapter) \
                and family != "vit":
            raise UserError(f"the {family} encoder has no attention blocks for LoRA, IA3, adapters, "
                            "prompts or prefixes; use full, linear_probe, freeze, bitfit, layernorm "
                            "or layerwise_lr_decay (or a ViT)")
        return heads.ImageClassifier(
            family=family, encoder_config=mod.config_from_hf(hf_config), num_labels=num_labels,
            head_dropout=0.0 if head_dropout is None else head_dropout, dropout=dropout,
            dtype=_DTYPES[dtype], peft=peft, update_batch_stats=update_batch_stats, image_size=image_size)
    if pooling not in heads.POOLINGS:
        raise UserError(f"config.model.pooling={pooling!r} is not one of {', '.join(heads.POOLINGS)}")
    cfg = _CONFIG_CLASSES[family].from_hf(hf_config)
    hidden_dropout = cfg.hidden_dropout_prob if dropout is None else dropout
    return heads.SequenceClassifier(
        family=family, encoder_config=cfg, num_labels=num_labels, pooling=pooling, dropout=dropout,
        head_dropout=hidden_dropout if head_dropout is None else head_dropout,
        initializer_range=cfg.initializer_range, dtype=_DTYPES[dtype], peft=peft)
