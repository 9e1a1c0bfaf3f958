"""HF DeBERTa-v2/v3 tensor names -> ftjax deberta_v2 parameter paths (explicit map, no guessing)."""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

FAMILY = "deberta_v2"
# HF name (after any "deberta." prefix) -> (ftjax path, transpose?)
_FIXED = {
    "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
    "embeddings.position_embeddings.weight": ("embeddings/position_embeddings/embedding", False),
    "embeddings.token_type_embeddings.weight": ("embeddings/token_type_embeddings/embedding", False),
    "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/LayerNorm/bias", False),
    "encoder.rel_embeddings.weight": ("encoder/rel_embeddings/embedding", False),
    "encoder.LayerNorm.weight": ("encoder/rel_LayerNorm/scale", False),
    "encoder.LayerNorm.bias": ("encoder/rel_LayerNorm/bias", False),
}
# outside the "deberta." model: the sequence classifier's ContextPooler
_POOLER = {
    "pooler.dense.weight": ("pooler/kernel", True),
    "pooler.dense.bias": ("pooler/bias", False),
}
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
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
# Known tensors with no place in an encoder + classification head: the masked-LM and
# replaced-token-detection heads of pretraining checkpoints, buffers.
_SKIP = re.compile(r"(embeddings\.position_ids|cls\..*|lm_predictions\..*|mask_predictions\..*|lm_head\..*)")


def _target(name: str) -> tuple[str, bool] | None:
    """Maps one HF tensor name to (ftjax path, transpose), None to skip."""
    original = name
    if name.startswith("classifier."):
        return ("head/" + ("kernel" if name.endswith("weight") else "bias"), name.endswith("weight"))
    if name in _POOLER:
        path, t = _POOLER[name]
        return f"{FAMILY}/{path}", t
    name = name.removeprefix("deberta.")
    if _SKIP.fullmatch(name):
        return None
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if name in _FIXED:
        path, t = _FIXED[name]
        return f"{FAMILY}/{path}", t
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        layer, module, kind = int(m.group(1)), _LAYER[m.group(2)], m.group(3)
        if module.endswith("LayerNorm"):
            return f"{FAMILY}/encoder/layer_{layer}/{module}/{'scale' if kind == 'weight' else 'bias'}", False
        return (f"{FAMILY}/encoder/layer_{layer}/{module}/{'kernel' if kind == 'weight' else 'bias'}",
                kind == "weight")
    raise ConvertError(f"unknown tensor {original!r} in a DeBERTa-v2 checkpoint; ftjax's deberta_v2 name map "
                       "does not know it")


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF DeBERTa-v2 tensors -> flat ftjax paths.

    Args:
      tensors: {HF tensor name: array} of a DebertaV2Model / ForMaskedLM /
        ForSequenceClassification checkpoint.

    Returns:
      {"params/deberta_v2/...": array, maybe "params/head/...": array}.

    Raises:
      ConvertError: a tensor name the map does not know.
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
    """ftjax classifier params ({"deberta_v2/...", "head/..."}) -> DebertaV2ForSequenceClassification tensors.

    The inverse of `convert`, built from the same name tables.

    Args:
      flat: flat params (no "params/" prefix), e.g. `ftjax.tree.flatten(params)`.

    Returns:
      {HF tensor name: float32 array}.

    Raises:
      ConvertError: a parameter with no place in an HF DeBERTa-v2 classifier (an adapter...).
    """
    fixed = {path: (name, t) for name, (path, t) in _FIXED.items()}
    pooler = {path: (name, t) for name, (path, t) in _POOLER.items()}
    layer = {module: name for name, module in _LAYER.items()}
    out = {}
    for path, arr in flat.items():
        arr = np.asarray(arr, np.float32)
        if path.startswith("head/"):
            leaf = path.split("/")[-1]
            out["classifier." + ("weight" if leaf == "kernel" else "bias")] = arr.T if leaf == "kernel" else arr
            continue
        inner = path[len(FAMILY) + 1:] if path.startswith(FAMILY + "/") else None
        if inner in pooler:
            name, transpose = pooler[inner]
            out[name] = arr.T if transpose else arr
            continue
        if inner in fixed:
            name, transpose = fixed[inner]
            out["deberta." + name] = arr.T if transpose else arr
            continue
        m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", inner or "")
        if not m or m.group(2) not in layer:
            raise ConvertError(f"parameter {path!r} has no place in an HF DeBERTa-v2 checkpoint")
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[m.group(3)]
        out[f"deberta.encoder.layer.{m.group(1)}.{layer[m.group(2)]}.{leaf}"] = (
            arr.T if m.group(3) == "kernel" else arr)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
