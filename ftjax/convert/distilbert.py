"""HF DistilBERT tensor names <-> ftjax DistilBERT parameter paths (explicit map, no guessing).

HF keeps the encoder under "distilbert." (no prefix in a bare DistilBertModel file) and
the classification layers at the top level: pre_classifier -> distilbert/pooler,
classifier -> head. The layers are named as ftjax's shared BERT layers.
"""

from __future__ import annotations

import re

from ftjax.convert.name_map import NameMap, dense, embeddings

_LAYER = {  # under "distilbert.transformer.layer.<i>."
    "attention.q_lin": "attention/query",
    "attention.k_lin": "attention/key",
    "attention.v_lin": "attention/value",
    "attention.out_lin": "attention/out",
    "sa_layer_norm": "attention_LayerNorm",
    "ffn.lin1": "intermediate",
    "ffn.lin2": "output",
    "output_layer_norm": "output_LayerNorm",
}

NAME_MAP = NameMap(
    family="distilbert", hf_prefix="distilbert.", display="DistilBERT",
    fixed=embeddings("word", "position"), layer=_LAYER, layers="transformer.layer",
    # top-level modules of DistilBertForSequenceClassification
    top={**dense("pre_classifier", "distilbert/pooler"), **dense("classifier", "head")},
    # Known tensors with no place in an encoder + classification head: the masked-LM head,
    # the question-answering head and the position-id buffer older files saved.
    skip_top=re.compile(r"(distilbert\.)?(vocab_transform|vocab_layer_norm|vocab_projector|qa_outputs)\..*"
                        r"|(distilbert\.)?embeddings\.position_ids"),
    gamma_beta=False, strict_leaves=True,
    unknown="unknown tensor {name!r} in a DistilBERT checkpoint; ftjax's DistilBERT name map does not know it",
)
convert = NAME_MAP.convert  # HF tensors -> {"params/distilbert/...", maybe "params/head/..."}
to_hf = NAME_MAP.to_hf  # the inverse: DistilBertForSequenceClassification tensors
