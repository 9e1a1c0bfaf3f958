"""HF ELECTRA tensor names -> ftjax ELECTRA parameter paths (explicit map, no guessing).

Reads ElectraForSequenceClassification, ElectraForPreTraining (the discriminator
checkpoints), ElectraForMaskedLM and bare ElectraModel files. The classification head
maps as: classifier.dense -> electra/pooler, classifier.out_proj -> head. The encoder
layers share BERT's names, so BERT's layer table serves here too.
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.bert import _LAYER
from ftjax.convert.safetensors_io import ConvertError

# HF name (after any "electra." prefix) -> (ftjax path under "electra/", transpose?)
_FIXED = {
    "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
    "embeddings.position_embeddings.weight": ("embeddings/position_embeddings/embedding", False),
    "embeddings.token_type_embeddings.weight": ("embeddings/token_type_embeddings/embedding", False),
    "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/LayerNorm/bias", False),
    "embeddings_project.weight": ("embeddings_project/kernel", True),
    "embeddings_project.bias": ("embeddings_project/bias", False),
}
# Full HF names of the sequence-classification head -> (ftjax path, transpose?)
_HEAD = {
    "classifier.dense.weight": ("electra/pooler/kernel", True),
    "classifier.dense.bias": ("electra/pooler/bias", False),
    "classifier.out_proj.weight": ("head/kernel", True),
    "classifier.out_proj.bias": ("head/bias", False),
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
# Buffers, and the pretraining heads: the discriminator's replaced-token head and the
# generator's masked-LM head have no place in an encoder + classification head.
_SKIP = re.compile(r"(electra\.)?embeddings\.(position_ids|token_type_ids)"
                   r"|discriminator_predictions\..*|generator_predictions\..*|generator_lm_head\..*")
_GENERATOR = re.compile(r"generator_predictions\..*|generator_lm_head\..*")


def _target(name: str) -> tuple[str, bool] | None:
    """Maps one HF tensor name to (ftjax path, transpose), None to skip."""
    if _SKIP.fullmatch(name):
        return None
    if name in _HEAD:
        return _HEAD[name]
    inner = name.removeprefix("electra.")
    # old TF-converted files name LayerNorm parameters gamma/beta
    inner = inner.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if inner in _FIXED:
        path, t = _FIXED[inner]
        return "electra/" + path, t
    m = _LAYER_RE.fullmatch(inner)
    if m and m.group(2) in _LAYER:
        layer, module, kind = int(m.group(1)), _LAYER[m.group(2)], m.group(3)
        if module.endswith("LayerNorm"):
            return f"electra/encoder/layer_{layer}/{module}/{'scale' if kind == 'weight' else 'bias'}", False
        leaf = "kernel" if kind == "weight" else "bias"
        return f"electra/encoder/layer_{layer}/{module}/{leaf}", kind == "weight"
    raise ConvertError(f"unknown tensor {name!r} in an ELECTRA checkpoint; ftjax's ELECTRA name map does not "
                       "know it (it reads ElectraForSequenceClassification, ElectraForPreTraining, "
                       "ElectraForMaskedLM and ElectraModel weights)")


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF ELECTRA tensors -> flat ftjax params.

    Args:
      tensors: {HF tensor name: array} of one checkpoint.

    Returns:
      {"params/electra/...": array, maybe "params/head/...": array}.

    Raises:
      ConvertError: on an unknown tensor name, or a generator-only checkpoint (its
        masked-LM head without the encoder it sits on).
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        target = _target(name)
        if target is None:
            continue
        path, transpose = target
        out["params/" + path] = np.ascontiguousarray(arr.T) if transpose else arr
    if not any(p.startswith("params/electra/encoder/") for p in out) and any(map(_GENERATOR.fullmatch, tensors)):
        raise ConvertError("this ELECTRA checkpoint holds only generator heads (generator_predictions.*, "
                           "generator_lm_head.*) and no encoder (electra.encoder.*) to fine-tune: use a "
                           "discriminator checkpoint such as google/electra-small-discriminator")
    return out


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax classifier params ({"electra/...", "head/..."}) -> ElectraForSequenceClassification tensors.

    The inverse of `convert`, built from the same name tables.

    Args:
      flat: flat params as "electra/..." and "head/..." paths (no "params/" prefix).

    Returns:
      {HF tensor name: float32 array}, weights in torch's (out, in) layout.
    """
    fixed = {path: (name, t) for name, (path, t) in _FIXED.items()}
    head = {path: (name, t) for name, (path, t) in _HEAD.items()}
    layer = {module: name for name, module in _LAYER.items()}
    out = {}
    for path, arr in flat.items():
        arr = np.asarray(arr, np.float32)
        if path in head:
            name, transpose = head[path]
            out[name] = arr.T if transpose else arr
            continue
        inner = path.removeprefix("electra/") if path.startswith("electra/") else None
        if inner in fixed:
            name, transpose = fixed[inner]
            out["electra." + name] = arr.T if transpose else arr
            continue
        m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", inner or "")
        if not m or m.group(2) not in layer:
            raise ConvertError(f"parameter {path!r} has no place in an HF ELECTRA checkpoint")
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[m.group(3)]
        out[f"electra.encoder.layer.{m.group(1)}.{layer[m.group(2)]}.{leaf}"] = (
            arr.T if m.group(3) == "kernel" else arr)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
