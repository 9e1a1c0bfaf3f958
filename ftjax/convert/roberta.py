"""HF RoBERTa / XLM-RoBERTa tensor names -> ftjax RoBERTa parameter paths (explicit map, no guessing).

Checkpoints come as RobertaModel (names with or without "roberta.", with a pooler),
RobertaForMaskedLM (no pooler; an lm_head, skipped) or RobertaForSequenceClassification
(classifier.dense + classifier.out_proj). The classification head's dense layer is
ftjax's pooler and its out_proj the task head, so a fine-tuned HF classifier converts
into the same logits; a RobertaModel's own pooler.dense also becomes the pooler.
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.bert import _LAYER  # the layers are bert.Layer: the per-layer names are BERT's
from ftjax.convert.safetensors_io import ConvertError

_NAME = "roberta"  # the encoder's parameters live under it
# HF name (after any "roberta." prefix) -> (ftjax path under roberta/, transpose?)
_FIXED = {
    "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
    "embeddings.position_embeddings.weight": ("embeddings/position_embeddings/embedding", False),
    "embeddings.token_type_embeddings.weight": ("embeddings/token_type_embeddings/embedding", False),
    "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/LayerNorm/bias", False),
}
# Both pooler sources; a checkpoint may hold one of them.
_POOLER = {
    "pooler.dense.weight": ("pooler/kernel", True),
    "pooler.dense.bias": ("pooler/bias", False),
    "classifier.dense.weight": ("pooler/kernel", True),
    "classifier.dense.bias": ("pooler/bias", False),
}
_HEAD = {"classifier.out_proj.weight": ("head/kernel", True), "classifier.out_proj.bias": ("head/bias", False)}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)")
# Known tensors with no place in an encoder + classification head: the position/type id
# buffers older checkpoints saved, and the masked-LM head.
_SKIP = re.compile(r"(embeddings\.position_ids|embeddings\.token_type_ids|lm_head\..*)")


def _target(name: str) -> tuple[str, bool] | None:
    """Maps one HF tensor name to (ftjax path, transpose), None to skip."""
    if name in _HEAD:
        return _HEAD[name]
    if name.startswith("classifier."):
        if name in _POOLER:
            path, t = _POOLER[name]
            return f"{_NAME}/{path}", t
        raise ConvertError(f"unknown tensor {name!r} in a RoBERTa checkpoint; ftjax reads the "
                           "RobertaForSequenceClassification head (classifier.dense, classifier.out_proj)")
    inner = name.removeprefix("roberta.")
    if _SKIP.fullmatch(inner):
        return None
    inner = inner.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if inner in _FIXED or inner in _POOLER:
        path, t = _FIXED.get(inner) or _POOLER[inner]
        return f"{_NAME}/{path}", t
    m = _LAYER_RE.fullmatch(inner)
    if m and m.group(2) in _LAYER:
        layer, module, kind = int(m.group(1)), _LAYER[m.group(2)], m.group(3)
        if module.endswith("LayerNorm"):
            return f"{_NAME}/encoder/layer_{layer}/{module}/{'scale' if kind == 'weight' else 'bias'}", False
        return f"{_NAME}/encoder/layer_{layer}/{module}/{'kernel' if kind == 'weight' else 'bias'}", kind == "weight"
    raise ConvertError(f"unknown tensor {name!r} in a RoBERTa checkpoint; ftjax's RoBERTa name map does not know it")


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF RoBERTa / XLM-R tensors -> flat ftjax params.

    Args:
      tensors: {HF tensor name: array} of a RobertaModel, RobertaForMaskedLM or
        RobertaForSequenceClassification checkpoint (XLM-R names are the same).

    Returns:
      {"params/roberta/...": array, maybe "params/head/...": array}.

    Raises:
      ConvertError: an unknown tensor name, or both a pooler and a classifier.dense.
    """
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for name, arr in tensors.items():
        target = _target(name)
        if target is None:
            continue
        path, transpose = target
        if path in source:  # only the pooler has two sources
            raise ConvertError(f"the checkpoint holds both {source[path]!r} and {name!r}; ftjax's RoBERTa has one "
                               "pooler (classifier.dense of a sequence classifier, or a RobertaModel's "
                               "pooler.dense): drop one of them")
        source[path] = name
        out["params/" + path] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax classifier params ({"roberta/...", "head/..."}) -> RobertaForSequenceClassification tensors.

    The inverse of `convert` for a sequence classifier: the pooler becomes
    classifier.dense and the head classifier.out_proj.

    Args:
      flat: flat params ("roberta/...", "head/...") without method additions (LoRA and
        IA3 merged first).

    Returns:
      {HF tensor name: float32 array}.

    Raises:
      ConvertError: a parameter with no place in an HF RoBERTa classifier.
    """
    fixed = {path: (name, t) for name, (path, t) in _FIXED.items()}
    layer = {module: name for name, module in _LAYER.items()}
    out = {}
    for path, arr in flat.items():
        arr = np.asarray(arr, np.float32)
        leaf = path.split("/")[-1]
        if path in ("head/kernel", "head/bias", f"{_NAME}/pooler/kernel", f"{_NAME}/pooler/bias"):
            module = "out_proj" if path.startswith("head/") else "dense"
            out[f"classifier.{module}.{'weight' if leaf == 'kernel' else 'bias'}"] = arr.T if leaf == "kernel" else arr
            continue
        inner = path[len(_NAME) + 1:] if path.startswith(_NAME + "/") else None
        if inner in fixed:
            name, transpose = fixed[inner]
            out["roberta." + name] = arr.T if transpose else arr
            continue
        m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", inner or "")
        if not m or m.group(2) not in layer:
            raise ConvertError(f"parameter {path!r} has no place in an HF RoBERTa checkpoint")
        hf_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[m.group(3)]
        out[f"roberta.encoder.layer.{m.group(1)}.{layer[m.group(2)]}.{hf_leaf}"] = (
            arr.T if m.group(3) == "kernel" else arr)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
