"""HF DistilBERT tensor names <-> ftjax DistilBERT parameter paths (explicit map, no guessing).

HF keeps the encoder under "distilbert." (no prefix in a bare DistilBertModel file) and
the classification layers at the top level: pre_classifier -> distilbert/pooler,
classifier -> head. The layers are named as ftjax's shared BERT layers.
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

# Module name tables: HF module -> (ftjax module, kind). The kind fixes the leaf names
# (and whether the torch (out, in) weight is transposed).
_LEAVES = {  # kind -> {HF leaf: (ftjax leaf, transpose)}
    "embed": {"weight": ("embedding", False)},
    "norm": {"weight": ("scale", False), "bias": ("bias", False)},
    "dense": {"weight": ("kernel", True), "bias": ("bias", False)},
}
_ENCODER = {  # under "distilbert."
    "embeddings.word_embeddings": ("embeddings/word_embeddings", "embed"),
    "embeddings.position_embeddings": ("embeddings/position_embeddings", "embed"),
    "embeddings.LayerNorm": ("embeddings/LayerNorm", "norm"),
}
_LAYER = {  # under "distilbert.transformer.layer.<i>."
    "attention.q_lin": ("attention/query", "dense"),
    "attention.k_lin": ("attention/key", "dense"),
    "attention.v_lin": ("attention/value", "dense"),
    "attention.out_lin": ("attention/out", "dense"),
    "sa_layer_norm": ("attention_LayerNorm", "norm"),
    "ffn.lin1": ("intermediate", "dense"),
    "ffn.lin2": ("output", "dense"),
    "output_layer_norm": ("output_LayerNorm", "norm"),
}
_TOP = {  # top-level HF modules of DistilBertForSequenceClassification -> ftjax paths from the root
    "pre_classifier": ("distilbert/pooler", "dense"),
    "classifier": ("head", "dense"),
}
_LAYER_RE = re.compile(r"transformer\.layer\.(\d+)\.(.+)")
_FTJAX_LAYER_RE = re.compile(r"encoder/layer_(\d+)/(.+)")
# Known tensors with no place in an encoder + classification head: the masked-LM head,
# the question-answering head and the position-id buffer older files saved.
_SKIP = re.compile(r"(distilbert\.)?(vocab_transform|vocab_layer_norm|vocab_projector|qa_outputs)\..*"
                   r"|(distilbert\.)?embeddings\.position_ids")


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _target(name: str) -> tuple[str, bool] | None:
    """Maps one HF tensor name to (ftjax path from the root, transpose), None to skip."""
    if _SKIP.fullmatch(name):
        return None
    module, leaf = _split(name)
    if module in _TOP:
        path, kind = _TOP[module]
    else:
        inner = module.removeprefix("distilbert.")
        m = _LAYER_RE.fullmatch(inner)
        if inner in _ENCODER:
            sub, kind = _ENCODER[inner]
            path = "distilbert/" + sub
        elif m and m.group(2) in _LAYER:
            sub, kind = _LAYER[m.group(2)]
            path = f"distilbert/encoder/layer_{int(m.group(1))}/{sub}"
        else:
            kind = None
    if kind is None or leaf not in _LEAVES[kind]:
        raise ConvertError(f"unknown tensor {name!r} in a DistilBERT checkpoint; ftjax's DistilBERT name map "
                           "does not know it")
    new_leaf, transpose = _LEAVES[kind][leaf]
    return f"{path}/{new_leaf}", transpose


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF DistilBERT tensors -> flat ftjax params.

    Args:
      tensors: {HF tensor name: array} of a DistilBertModel, DistilBertForMaskedLM or
        DistilBertForSequenceClassification file.

    Returns:
      {"params/distilbert/...": array, maybe "params/head/...": array}.
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        target = _target(name)
        if target is None:
            continue
        path, transpose = target
        out["params/" + path] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax classifier params -> DistilBertForSequenceClassification tensors (the inverse of `convert`).

    Args:
      flat: {"distilbert/...": array, "head/...": array} (paths from the params root).

    Returns:
      {HF tensor name: float32 array}.
    """
    def inverse(table):
        return {path: (hf, kind) for hf, (path, kind) in table.items()}

    top, encoder, layer = inverse(_TOP), inverse(_ENCODER), inverse(_LAYER)
    out = {}
    for path, arr in flat.items():
        module, _, leaf = path.rpartition("/")
        inner = module[len("distilbert/"):] if module.startswith("distilbert/") else None
        m = _FTJAX_LAYER_RE.fullmatch(inner or "")
        if module in top:
            hf, kind = top[module]
        elif inner in encoder:
            hf, kind = encoder[inner]
            hf = "distilbert." + hf
        elif m and m.group(2) in layer:
            hf, kind = layer[m.group(2)]
            hf = f"distilbert.transformer.layer.{m.group(1)}.{hf}"
        else:
            raise ConvertError(f"parameter {path!r} has no place in an HF DistilBERT checkpoint")
        leaves = {new: (old, t) for old, (new, t) in _LEAVES[kind].items()}
        if leaf not in leaves:
            raise ConvertError(f"parameter {path!r} has no place in an HF DistilBERT checkpoint")
        hf_leaf, transpose = leaves[leaf]
        arr = np.asarray(arr, np.float32)
        out[f"{hf}.{hf_leaf}"] = np.ascontiguousarray(arr.T if transpose else arr)
    return out
