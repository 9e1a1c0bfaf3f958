"""HF DeBERTa-v2/v3 tensor names -> ftjax deberta_v2 parameter paths (explicit map, no guessing).

Besides BERT-style embeddings, the encoder holds the relative-position embeddings and
their LayerNorm; the sequence classifier's ContextPooler ("pooler.dense") sits outside
the "deberta." model, and its head is one Linear ("classifier").
"""

from __future__ import annotations

import re

from ftjax.convert.name_map import NameMap, dense, embed, embeddings, norm

FAMILY = "deberta_v2"
_LAYER = {
    "attention.self.query_proj": "attention/query",
    "attention.self.key_proj": "attention/key",
    "attention.self.value_proj": "attention/value",
    "attention.self.pos_key_proj": "attention/pos_key",
    "attention.self.pos_query_proj": "attention/pos_query",
    "attention.output.dense": "attention/out",
    "attention.output.LayerNorm": "attention_LayerNorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_LayerNorm",
}

NAME_MAP = NameMap(
    family=FAMILY, hf_prefix="deberta.", display="DeBERTa-v2",
    fixed={**embeddings("word", "position", "token_type"), **embed("encoder.rel_embeddings", "encoder/rel_embeddings"),
           **norm("encoder.LayerNorm", "encoder/rel_LayerNorm")},
    top=dense("pooler.dense", f"{FAMILY}/pooler"), layer=_LAYER, linear_head=True,
    # Known tensors with no place in an encoder + classification head: the masked-LM and
    # replaced-token-detection heads of pretraining checkpoints, buffers.
    skip=re.compile(r"(embeddings\.position_ids|cls\..*|lm_predictions\..*|mask_predictions\..*|lm_head\..*)"),
    unknown="unknown tensor {name!r} in a DeBERTa-v2 checkpoint; ftjax's deberta_v2 name map does not know it",
)
convert = NAME_MAP.convert  # HF tensors -> {"params/deberta_v2/...", maybe "params/head/..."}
to_hf = NAME_MAP.to_hf  # the inverse: DebertaV2ForSequenceClassification tensors
