"""HF MPNet tensor names -> ftjax MPNet parameter paths (explicit map, no guessing).

Reads MPNetModel checkpoints (names with or without "mpnet.", with or without a pooler),
MPNetForMaskedLM (the LM head is skipped) and MPNetForSequenceClassification (its
classifier.dense becomes the encoder's pooler, classifier.out_proj the task head).
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

# HF name (after any "mpnet." prefix) -> (ftjax path under "mpnet/", transpose?)
_FIXED = {
    "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
    "embeddings.position_embeddings.weight": ("embeddings/position_embeddings/embedding", False),
    "embeddings.LayerNorm.weight": ("embeddings/LayerNorm/scale", False),
    "embeddings.LayerNorm.bias": ("embeddings/LayerNorm/bias", False),
    "encoder.relative_attention_bias.weight": ("relative_attention_bias/embedding", False),
    "pooler.dense.weight": ("pooler/kernel", True),
    "pooler.dense.bias": ("pooler/bias", False),
}
# MPNetForSequenceClassification's head (top level, no "mpnet." prefix) -> ftjax path.
_CLASSIFIER = {
    "classifier.dense.weight": ("mpnet/pooler/kernel", True),
    "classifier.dense.bias": ("mpnet/pooler/bias", False),
    "classifier.out_proj.weight": ("head/kernel", True),
    "classifier.out_proj.bias": ("head/bias", False),
}
_LAYER = {
    "attention.attn.q": "attention/query",
    "attention.attn.k": "attention/key",
    "attention.attn.v": "attention/value",
    "attention.attn.o": "attention/out",
    "attention.LayerNorm": "attention_LayerNorm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_LayerNorm",
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
# Known tensors with no place in an encoder + classification head.
_SKIP = re.compile(r"(embeddings\.position_ids|lm_head\..*)")


def _target(name: str) -> tuple[str, bool] | None:
    """Maps one HF tensor name to (ftjax path, transpose), None to skip."""
    if name in _CLASSIFIER:
        return _CLASSIFIER[name]
    if _SKIP.fullmatch(name):
        return None
    name = name.removeprefix("mpnet.")
    if _SKIP.fullmatch(name):
        return None
    if name in _FIXED:
        path, transpose = _FIXED[name]
        return "mpnet/" + path, transpose
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        layer, module, kind = int(m.group(1)), _LAYER[m.group(2)], m.group(3)
        if module.endswith("LayerNorm"):
            return f"mpnet/encoder/layer_{layer}/{module}/{'scale' if kind == 'weight' else 'bias'}", False
        return f"mpnet/encoder/layer_{layer}/{module}/{'kernel' if kind == 'weight' else 'bias'}", kind == "weight"
    raise ConvertError(f"unknown tensor {name!r} in an MPNet checkpoint; ftjax's MPNet name map does not know it")


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF MPNet tensors -> flat ftjax paths.

    Args:
      tensors: HF tensor name -> array (PyTorch layout).

    Returns:
      {"params/mpnet/...": array, maybe "params/head/...": array}.

    Raises:
      ConvertError: an unknown tensor name, or both a pooler and a classifier.dense
        (two candidates for the one pre-classifier layer).
    """
    if any(n.endswith("pooler.dense.weight") for n in tensors) and "classifier.dense.weight" in tensors:
        raise ConvertError("this MPNet checkpoint has both pooler.dense and classifier.dense; ftjax keeps one "
                           "pre-classifier layer (mpnet/pooler): drop one of them from the checkpoint")
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        target = _target(name)
        if target is None:
            continue
        path, transpose = target
        out["params/" + path] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax classifier params ({"mpnet/...", "head/..."}) -> MPNetForSequenceClassification tensors.

    The inverse of `convert` for a classifier, built from the same name tables: the
    pooler goes to classifier.dense (MPNetForSequenceClassification has no pooler).

    Args:
      flat: "/"-joined parameter path -> array.

    Returns:
      HF tensor name -> float32 array (PyTorch layout).

    Raises:
      ConvertError: a parameter with no place in an HF MPNet classifier (e.g. a
        method's own additions).
    """
    classifier = {path: (name, t) for name, (path, t) in _CLASSIFIER.items()}
    fixed = {path: (name, t) for name, (path, t) in _FIXED.items() if not name.startswith("pooler.")}
    layer = {module: name for name, module in _LAYER.items()}
    out = {}
    for path, arr in flat.items():
        arr = np.asarray(arr, np.float32)
        if path in classifier:
            name, transpose = classifier[path]
            out[name] = arr.T if transpose else arr
            continue
        inner = path[len("mpnet/"):] if path.startswith("mpnet/") else None
        if inner in fixed:
            name, transpose = fixed[inner]
            out["mpnet." + name] = arr.T if transpose else arr
            continue
        m = re.fullmatch(r"encoder/layer_(\d+)/(.+)/(kernel|bias|scale)", inner or "")
        if not m or m.group(2) not in layer:
            raise ConvertError(f"parameter {path!r} has no place in an HF MPNet checkpoint")
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[m.group(3)]
        out[f"mpnet.encoder.layer.{m.group(1)}.{layer[m.group(2)]}.{leaf}"] = (
            arr.T if m.group(3) == "kernel" else arr)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
