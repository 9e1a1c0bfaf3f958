"""HF BERT tensor names -> ftjax BERT parameter paths (explicit map, no guessing)."""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

# HF name (after any "bert." prefix) -> (ftjax path, transpose?)
_FIXED = {
    "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
    "embeddings.position_embeddings.weight": ("embeddings/position_embeddings/embedding", False),
    "embeddings.token_type_embeddings.weight": ("embeddings/token_type_embeddings/embedding", False),
    "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/LayerNorm/bias", False),
    "pooler.dense.weight": ("pooler/kernel", True),
    "pooler.dense.bias": ("pooler/bias", False),
}
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
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)")
# Known tensors with no place in an encoder + classification head.
_SKIP = re.compile(r"(embeddings\.position_ids|cls\..*|.*\.masked_bias|lm_head\..*)")


def _target(name: str) -> tuple[str, bool] | None:
    """Maps one HF tensor name to (ftjax path, transpose), None to skip."""
    if name.startswith("classifier."):
        return ("head/" + ("kernel" if name.endswith("weight") else "bias"), name.endswith("weight"))
    name = name[len("bert."):] if name.startswith("bert.") else name
    if _SKIP.fullmatch(name):
        return None
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if name in _FIXED:
        path, t = _FIXED[name]
        return "bert/" + path, t
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        layer, module, kind = int(m.group(1)), _LAYER[m.group(2)], m.group(3)
        if module.endswith("LayerNorm"):
            leaf = "scale" if kind == "weight" else "bias"
            return f"bert/encoder/layer_{layer}/{module}/{leaf}", False
        return f"bert/encoder/layer_{layer}/{module}/{'kernel' if kind == 'weight' else 'bias'}", kind == "weight"
    raise ConvertError(f"unknown tensor {name!r} in a BERT checkpoint; ftjax's BERT name map does not know it")


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns {"params/bert/...": array, maybe "params/head/...": array} flat paths from HF tensors."""
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        target = _target(name)
        if target is None:
            continue
        path, transpose = target
        out["params/" + path] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax classifier params ({"bert/...", "head/..."}) -> BertForSequenceClassification tensors.

    The inverse of `convert`, built from the same name tables.
    """
    fixed = {path: (name, t) for name, (path, t) in _FIXED.items()}
    layer = {module: name for name, module in _LAYER.items()}
    out = {}
    for path, arr in flat.items():
        arr = np.asarray(arr, np.float32)
        if path.startswith("head/"):
            leaf = path.split("/")[-1]
            out["classifier." + ("weight" if leaf == "kernel" else "bias")] = arr.T if leaf == "kernel" else arr
            continue
        inner = path[len("bert/"):]
        if inner in fixed:
            name, transpose = fixed[inner]
            out["bert." + name] = arr.T if transpose else arr
            continue
        m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", inner)
        if not m or m.group(2) not in layer:
            raise ConvertError(f"parameter {path!r} has no place in an HF BERT checkpoint")
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[m.group(3)]
        out[f"bert.encoder.layer.{m.group(1)}.{layer[m.group(2)]}.{leaf}"] = arr.T if m.group(3) == "kernel" else arr
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
