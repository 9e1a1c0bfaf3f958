"""HF MPNet tensor names -> ftjax MPNet parameter paths (explicit map, no guessing).

Reads MPNetModel checkpoints (names with or without "mpnet.", with or without a pooler),
MPNetForMaskedLM (the LM head is skipped) and MPNetForSequenceClassification (its
classifier.dense becomes the encoder's pooler, classifier.out_proj the task head). A
checkpoint with both a pooler and a classifier.dense is refused; `to_hf` writes the
pooler as classifier.dense (MPNetForSequenceClassification has no pooler).
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.name_map import (
    NameMap,
    classification_head,
    dense,
    embed,
    embeddings,
)
from ftjax.convert.safetensors_io import ConvertError

_LAYER = {
    "attention.attn.q": "attention/query",
    "attention.attn.k": "attention/key",
    "attention.attn.v": "attention/value",
    "attention.attn.o": "attention/out",
    "attention.LayerNorm": "attention_LayerNorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_LayerNorm",
}
# Known tensors with no place in an encoder + classification head.
_SKIP = re.compile(r"(embeddings\.position_ids|lm_head\..*)")


def _refuse_two_poolers(tensors: dict[str, np.ndarray]) -> None:
    """Two candidates for the one pre-classifier layer: refused before any name is mapped."""
    if any(n.endswith("pooler.dense.weight") for n in tensors) and "classifier.dense.weight" in tensors:
        raise ConvertError("this MPNet checkpoint has both pooler.dense and classifier.dense; ftjax keeps one "
                           "pre-classifier layer (mpnet/pooler): drop one of them from the checkpoint")


NAME_MAP = NameMap(
    family="mpnet", hf_prefix="mpnet.", display="MPNet",
    fixed={**embeddings("word", "position"), **embed("encoder.relative_attention_bias", "relative_attention_bias"),
           **dense("pooler.dense", "pooler")},
    top=classification_head("mpnet"), layer=_LAYER, skip_top=_SKIP, skip=_SKIP, gamma_beta=False,
    unknown="unknown tensor {inner!r} in an MPNet checkpoint; ftjax's MPNet name map does not know it",
    before=_refuse_two_poolers,
)
convert = NAME_MAP.convert  # HF tensors -> {"params/mpnet/...", maybe "params/head/..."}
to_hf = NAME_MAP.to_hf  # the inverse: MPNetForSequenceClassification tensors
