"""HF ELECTRA tensor names -> ftjax ELECTRA parameter paths (explicit map, no guessing).

Reads ElectraForSequenceClassification, ElectraForPreTraining (the discriminator
checkpoints), ElectraForMaskedLM and bare ElectraModel files. The classification head
maps as: classifier.dense -> electra/pooler, classifier.out_proj -> head. The encoder
layers share BERT's names, so BERT's layer table serves here too. A generator-only
checkpoint (its masked-LM head without the encoder it sits on) is refused.
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.bert import _LAYER
from ftjax.convert.name_map import NameMap, classification_head, dense, embeddings
from ftjax.convert.safetensors_io import ConvertError

# Full HF names of the sequence-classification head -> (ftjax path, transpose?)
_HEAD = classification_head("electra")
_GENERATOR = re.compile(r"generator_predictions\..*|generator_lm_head\..*")


def _refuse_generator_only(tensors: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
    """A generator checkpoint has its masked-LM head but not the encoder it sits on."""
    if not any(p.startswith("params/electra/encoder/") for p in out) and any(map(_GENERATOR.fullmatch, tensors)):
        raise ConvertError("this ELECTRA checkpoint holds only generator heads (generator_predictions.*, "
                           "generator_lm_head.*) and no encoder (electra.encoder.*) to fine-tune: use a "
                           "discriminator checkpoint such as google/electra-small-discriminator")


NAME_MAP = NameMap(
    family="electra", hf_prefix="electra.", display="ELECTRA",
    fixed={**embeddings("word", "position", "token_type"), **dense("embeddings_project", "embeddings_project")},
    top=_HEAD, layer=_LAYER,
    # Buffers, and the pretraining heads: the discriminator's replaced-token head and the
    # generator's masked-LM head have no place in an encoder + classification head.
    skip_top=re.compile(r"(electra\.)?embeddings\.(position_ids|token_type_ids)"
                        r"|discriminator_predictions\..*|generator_predictions\..*|generator_lm_head\..*"),
    unknown=("unknown tensor {name!r} in an ELECTRA checkpoint; ftjax's ELECTRA name map does not "
             "know it (it reads ElectraForSequenceClassification, ElectraForPreTraining, "
             "ElectraForMaskedLM and ElectraModel weights)"),
    after=_refuse_generator_only,
)
convert = NAME_MAP.convert  # HF tensors -> {"params/electra/...", maybe "params/head/..."}
to_hf = NAME_MAP.to_hf  # the inverse: ElectraForSequenceClassification tensors
