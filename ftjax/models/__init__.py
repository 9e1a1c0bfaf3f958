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
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TEXT_FAMILIES = ("bert",)
# family -> (module, config class name); imported on first use (Flax CNNs cost import time)
IMAGE_FAMILIES = {"vit": ("ftjax.models.vit", "ViTConfig"), "resnet": ("ftjax.models.resnet", "ResNetConfig"),
                  "efficientnet": ("ftjax.models.efficientnet", "EfficientNetConfig")}
FAMILIES = TEXT_FAMILIES + tuple(IMAGE_FAMILIES)


def _vit(hidden: int, layers: int, n_heads: int, mlp: int, patch: int = 16, image: int = 224) -> dict[str, Any]:
    return {"model_type": "vit", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": n_heads,
            "intermediate_size": mlp, "patch_size": patch, "image_size": image, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _resnet(kind: str, depths: list[int]) -> dict[str, Any]:
    sizes = [64, 128, 256, 512] if kind == "basic" else [256, 512, 1024, 2048]
    return {"model_type": "resnet", "layer_type": kind, "depths": depths, "hidden_sizes": sizes,
            "embedding_size": 64, "num_channels": 3, "hidden_act": "relu", "downsample_in_first_stage": False}


# Named image variants (from scratch, or the config of a weights file without config.json).
IMAGE_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "vit": {"ti16": _vit(192, 12, 3, 768), "s16": _vit(384, 12, 6, 1536), "b16": _vit(768, 12, 12, 3072),
            "b32": _vit(768, 12, 12, 3072, patch=32), "l16": _vit(1024, 24, 16, 4096)},
    "resnet": {"18": _resnet("basic", [2, 2, 2, 2]), "34": _resnet("basic", [3, 4, 6, 3]),
               "50": _resnet("bottleneck", [3, 4, 6, 3]), "101": _resnet("bottleneck", [3, 4, 23, 3])},
    "efficientnet": {f"lite{i}": {"model_type": "efficientnet", "variant": f"lite{i}"} for i in range(5)},
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def modality(family: str) -> str:
    """"text" or "image"."""
    _check_family(family)
    return "text" if family in TEXT_FAMILIES else "image"


def _image_module(family: str):
    return importlib.import_module(IMAGE_FAMILIES[family][0])


def image_config(family: str, hf_config: dict[str, Any]):
    """The image family's config dataclass from its config.json dict."""
    return getattr(_image_module(family), IMAGE_FAMILIES[family][1]).from_hf(hf_config)


def layout(family: str, hf_config: dict[str, Any]) -> Layout:
    """The family's depth groups (see ftjax.models.layout) for this config."""
    _check_family(family)
    if family == "bert":
        return bert_layout(int(hf_config["num_hidden_layers"]))
    return _image_module(family).layout(image_config(family, hf_config))


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
    variants = {(f, v): c for (f, v), c in VARIANTS.items()}
    if family in IMAGE_FAMILIES:
        mod = _image_module(family)
        tiny = {"vit": "TINY_VIT", "resnet": "TINY_RESNET", "efficientnet": "TINY_EFFICIENTNET"}[family]
        variants[(family, "tiny")] = getattr(mod, tiny)
        variants.update({(family, v): c for v, c in IMAGE_VARIANTS[family].items()})
    if (family, variant) not in variants:
        known = ", ".join(v for f, v in variants if f == family)
        raise UserError(f"unknown model variant {family}/{variant}; known: {known}")
    return json.loads(json.dumps(variants[(family, variant)]))  # a deep copy


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
        the reference classifier's dropout (EfficientNet) or 0 (other image encoders).
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
        cfg = image_config(family, hf_config)
        if (peft.prefix_tokens or peft.prompt_tokens or peft.lora_rank or peft.ia3 or peft.adapter) \
                and family != "vit":
            raise UserError(f"the {family} encoder has no attention blocks for LoRA, IA3, adapters, "
                            "prompts or prefixes; use full, linear_probe, freeze, bitfit, layernorm "
                            "or layerwise_lr_decay (or a ViT)")
        if head_dropout is None:  # EfficientNet's reference dropout before its classifier, else none
            head_dropout = float(getattr(cfg, "dropout_rate", 0.0))
        return heads.ImageClassifier(
            family=family, encoder_config=cfg, num_labels=num_labels, head_dropout=head_dropout, dropout=dropout,
            dtype=_DTYPES[dtype], peft=peft, update_batch_stats=update_batch_stats, image_size=image_size)
    if pooling not in heads.POOLINGS:
        raise UserError(f"config.model.pooling={pooling!r} is not one of {', '.join(heads.POOLINGS)}")
    cfg = _CONFIG_CLASSES[family].from_hf(hf_config)
    hidden_dropout = cfg.hidden_dropout_prob if dropout is None else dropout
    return heads.SequenceClassifier(
        family=family, encoder_config=cfg, num_labels=num_labels, pooling=pooling, dropout=dropout,
        head_dropout=hidden_dropout if head_dropout is None else head_dropout,
        initializer_range=cfg.initializer_range, dtype=_DTYPES[dtype], peft=peft)
