"""What ftjax knows about one model family, in one place: `FamilySpec`.

Each family module (`ftjax/models/bert.py`, `vit.py`, ...) exports `FAMILY`, a
FamilySpec; `ftjax.models.FAMILIES` lists the modules. The trainer, the tasks, the
converters, the methods and the HF export read a family only through its spec, so
adding a family is one model module, one converter module and one registry line.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from ftjax.models.layers import Peft
from ftjax.models.layout import Layout

MODALITIES = ("text", "image", "audio")


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """Run-time options every encoder is built with; a family takes the ones it has.

    Attributes:
      dtype: compute dtype (parameters stay float32).
      peft: the method's model-side additions (LoRA, IA3, adapters, prompts, prefixes).
      dropout: overrides the encoder's hidden dropout when set.
      update_batch_stats: BatchNorm encoders: train with batch statistics and update them.
      image_size: image encoders: the input resolution (ViT position embeddings).
    """

    dtype: Any = jnp.float32
    peft: Peft = Peft()
    dropout: float | None = None
    update_batch_stats: bool = False
    image_size: int | None = None


@dataclasses.dataclass(frozen=True)
class HFExport:
    """How a fine-tuned classifier of this family becomes an HF folder.

    Attributes:
      architecture: the transformers class name written to config.json.
      model_type: config.json "model_type".
      check: meta -> None; raises UserError when the run cannot be exported faithfully.
    """

    architecture: str
    model_type: str
    check: Callable[[dict], None] = lambda meta: None


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """A model family.

    Attributes:
      name: the family's name; its encoder's parameters live under it ("bert/...").
      modality: "text", "image" or "audio": what the inputs are.
      config_class: the encoder config dataclass, with `from_hf(config.json dict)`.
      encoder: (encoder config, EncoderOptions, name) -> the Linen encoder module.
      layout: encoder config -> Layout (depth groups for the path-regex methods).
      converter: module path of the weights name map: `convert(tensors)` -> flat
        {"params/...": array, ["batch_stats/...": array]}; optional `to_hf(flat params)`.
      variants: named HF-style config dicts, "tiny" included (from scratch, or the
        config of a weights file that has no config.json).
      provides: encoder features the methods may need, e.g. ("attention",).
      model_types: the config.json "model_type" values this family reads (a config
        with model.family unset picks its family by them).
      optional: regexes of encoder parameters a pretrained checkpoint may lack (a
        pooler that masked-LM checkpoints do not ship); absent ones keep their init.
      load: optional (loaded variables, fresh variables) -> loaded variables: weight
        surgery before the strict merge (ViT resamples its position embeddings).
      hf_export: optional HFExport; None: the family has no HF export.
      head_dropout: optional encoder config -> the dropout before a task head when
        config.model.head_dropout is None (the hook may return None too); None: the
        encoder's hidden dropout (or config.model.dropout) for text, 0 for images.
    """

    name: str
    modality: str
    config_class: type
    encoder: Callable[[Any, EncoderOptions, str], nn.Module]
    layout: Callable[[Any], Layout]
    converter: str
    variants: dict[str, dict[str, Any]]
    provides: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    load: Callable[[dict, dict], dict] | None = None
    hf_export: HFExport | None = None
    head_dropout: Callable[[Any], float] | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"family {self.name}: modality {self.modality!r} is not one of {MODALITIES}")
        if "tiny" not in self.variants:
            raise ValueError(f"family {self.name} has no 'tiny' variant")

    def config(self, model_config: dict[str, Any]):
        """The encoder config dataclass of the family's config dict (an HF config.json or a variant)."""
        return self.config_class.from_hf(model_config)

    def converter_module(self):
        """The weights name-map module (`convert`, maybe `to_hf`)."""
        return importlib.import_module(self.converter)
