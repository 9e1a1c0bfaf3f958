"""HF BERT tensor names -> ftjax BERT parameter paths (explicit map, no guessing)."""

from __future__ import annotations

import re

from ftjax.convert.name_map import NameMap, dense, embeddings

# HF module in a layer -> ftjax module; RoBERTa and ELECTRA layers share these names.
_LAYER = {
    "attention.self.query": "attention/query",
    "attention.self.key": "attention/key",
    "attention.self.value": "attention/value",
    "attention.output.dense": "attention/out",
    "attention.output.LayerNorm": "attention_LayerNorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_LayerNorm",
}

NAME_MAP = NameMap(
    family="bert", hf_prefix="bert.", display="BERT",
    fixed={**embeddings("word", "position", "token_type"), **dense("pooler.dense", "pooler")},
    layer=_LAYER, layer_leaves="weight|bias|gamma|beta", linear_head=True,
    # Known tensors with no place in an encoder + classification head.
    skip=re.compile(r"(embeddings\.position_ids|cls\..*|.*\.masked_bias|lm_head\..*)"),
    unknown="unknown tensor {inner!r} in a BERT checkpoint; ftjax's BERT name map does not know it",
    unchecked_prefix=True,
)
convert = NAME_MAP.convert  # HF tensors -> {"params/bert/...", maybe "params/head/..."}
to_hf = NAME_MAP.to_hf  # the inverse: BertForSequenceClassification tensors
