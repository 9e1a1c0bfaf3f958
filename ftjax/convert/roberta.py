"""HF RoBERTa / XLM-RoBERTa tensor names -> ftjax RoBERTa parameter paths (explicit map, no guessing).

Checkpoints come as RobertaModel (names with or without "roberta.", with a pooler),
RobertaForMaskedLM (no pooler; an lm_head, skipped) or RobertaForSequenceClassification
(classifier.dense + classifier.out_proj). The classification head's dense layer is
ftjax's pooler and its out_proj the task head, so a fine-tuned HF classifier converts
into the same logits; a RobertaModel's own pooler.dense also becomes the pooler. A
checkpoint holding both pooler sources is refused. `to_hf` writes a sequence
classifier: the pooler becomes classifier.dense and the head classifier.out_proj.
"""

from __future__ import annotations

import re

from ftjax.convert.bert import _LAYER
from ftjax.convert.name_map import NameMap, classification_head, dense, embeddings

NAME_MAP = NameMap(
    family="roberta", hf_prefix="roberta.", display="RoBERTa",
    # Both pooler sources (under "roberta." too); a checkpoint may hold one of them.
    fixed={**embeddings("word", "position", "token_type"), **dense("pooler.dense", "pooler"),
           **dense("classifier.dense", "pooler")},
    top=classification_head("roberta"),
    layer=_LAYER, layer_leaves="weight|bias|gamma|beta",  # bert.Layer: the per-layer names are BERT's
    # Known tensors with no place in an encoder + classification head: the position/type id
    # buffers older checkpoints saved, and the masked-LM head.
    skip=re.compile(r"(embeddings\.position_ids|embeddings\.token_type_ids|lm_head\..*)"),
    unknown="unknown tensor {name!r} in a RoBERTa checkpoint; ftjax's RoBERTa name map does not know it",
    classifier_unknown=("unknown tensor {name!r} in a RoBERTa checkpoint; ftjax reads the "
                        "RobertaForSequenceClassification head (classifier.dense, classifier.out_proj)"),
    duplicate=("the checkpoint holds both {first!r} and {second!r}; ftjax's RoBERTa has one pooler "
               "(classifier.dense of a sequence classifier, or a RobertaModel's pooler.dense): drop one of them"),
)
convert = NAME_MAP.convert  # HF tensors -> {"params/roberta/...", maybe "params/head/..."}
to_hf = NAME_MAP.to_hf  # the inverse: RobertaForSequenceClassification tensors
