"""HF ViT tensor names -> ftjax ViT paths (explicit map, every shape checked).

Output keys start with the collection: "params/vit/...", and "params/head/{kernel,bias}"
for HF's classifier. A ViTModel's pooler and mask token have no place in the encoder
ViTForImageClassification uses and are skipped. Position embeddings are converted as
they are; fit them to another image size with ftjax.models.vit.resample_posemb.
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.resnet import conv_kernel, linear_head
from ftjax.convert.safetensors_io import ConvertError

_FIXED = {
    "embeddings.cls_token": "embeddings/cls_token",
    "embeddings.position_embeddings": "embeddings/position_embeddings",
    "embeddings.patch_embeddings.projection.bias": "embeddings/patch_embeddings/projection/bias",
    "layernorm.weight": "layernorm/scale",
    "layernorm.bias": "layernorm/bias",
}
_PATCH = "embeddings.patch_embeddings.projection.weight"
# HF module in a layer -> (ftjax module, is a LayerNorm)
_LAYER = {
    "attention.attention.query": ("attention/query", False),
    "attention.attention.key": ("attention/key", False),
    "attention.attention.value": ("attention/value", False),
    "attention.output.dense": ("attention/output", False),
    "intermediate.dense": ("intermediate", False),
    "output.dense": ("output", False),
    "layernorm_before": ("layernorm_before", True),
    "layernorm_after": ("layernorm_after", True),
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_SKIP = re.compile(r"pooler\..*|embeddings\.mask_token")


def _expected(tensors: dict[str, np.ndarray], layers: int) -> dict[str, tuple[int, ...]]:
    """HF name (no "vit." prefix) -> shape, from the hidden size, MLP width and patch conv."""
    for key in ("embeddings.cls_token", _PATCH, "encoder.layer.0.intermediate.dense.weight"):
        if key not in tensors:
            raise ConvertError(f"tensor {key!r} is missing from the ViT checkpoint")
    d = tensors["embeddings.cls_token"].shape[-1]
    mlp = tensors["encoder.layer.0.intermediate.dense.weight"].shape[0]
    patch = tensors[_PATCH].shape
    if len(patch) != 4 or patch[0] != d:
        raise ConvertError(f"tensor {_PATCH!r} has shape {list(patch)}; expected [{d}, channels, p, p]")
    pos = tensors.get("embeddings.position_embeddings")
    n = pos.shape[1] if pos is not None and pos.ndim == 3 else 1
    shapes = {"embeddings.cls_token": (1, 1, d), "embeddings.position_embeddings": (1, n, d),
              "embeddings.patch_embeddings.projection.bias": (d,), "layernorm.weight": (d,), "layernorm.bias": (d,)}
    for i in range(layers):
        for module in _LAYER:
            out, inp = {"intermediate.dense": (mlp, d), "output.dense": (d, mlp)}.get(module, (d, d))
            shapes[f"encoder.layer.{i}.{module}.bias"] = (out,)
            shapes[f"encoder.layer.{i}.{module}.weight"] = (out,) if _LAYER[module][1] else (out, inp)
    return shapes


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF ViT(Model|ForImageClassification) tensors -> flat ftjax arrays.

    Args:
      tensors: {HF name: array}, with or without the "vit." prefix.

    Returns:
      {"params/vit/...": array, maybe "params/head/...": array}.
    """
    inner: dict[str, np.ndarray] = {}
    layers = set()
    for name, arr in tensors.items():
        if name.startswith("classifier."):
            if name not in ("classifier.weight", "classifier.bias"):
                raise ConvertError(f"unexpected tensor {name!r} in a ViT checkpoint")
            continue
        key = name[len("vit."):] if name.startswith("vit.") else name
        if _SKIP.fullmatch(key):
            continue
        m = _LAYER_RE.fullmatch(key)
        if key in _FIXED or key == _PATCH:
            inner[key] = arr
        elif m and m.group(2) in _LAYER:
            inner[key] = arr
            layers.add(int(m.group(1)))
        else:
            raise ConvertError(f"unexpected tensor {name!r} in a ViT checkpoint; ftjax's ViT map does not know it")
    if not layers:
        raise ConvertError("the checkpoint has no ViT encoder layers (vit.encoder.layer.*)")
    num_layers = max(layers) + 1
    shapes = _expected(inner, num_layers)
    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key not in inner:
            raise ConvertError(f"tensor {key!r} is missing from the ViT checkpoint")
        arr = np.asarray(inner[key], np.float32)
        if arr.shape != shape:
            raise ConvertError(f"tensor {key!r} has shape {list(arr.shape)}; expected {list(shape)}")
        if key in _FIXED:
            out["params/vit/" + _FIXED[key]] = arr
            continue
        i, module, kind = _LAYER_RE.fullmatch(key).groups()
        path, norm = _LAYER[module]
        leaf = ("scale" if norm else "kernel") if kind == "weight" else "bias"
        value = np.ascontiguousarray(arr.T) if leaf == "kernel" else arr
        out[f"params/vit/encoder/layer_{i}/{path}/{leaf}"] = value
    out["params/vit/embeddings/patch_embeddings/projection/kernel"] = conv_kernel(_PATCH, inner[_PATCH])
    return {**out, **linear_head(tensors, "classifier")}
