"""HF ResNet tensor names -> ftjax ResNet paths, and the conv/BatchNorm helpers the CNN converters share.

Output keys start with the collection: "params/resnet/...", "batch_stats/resnet/.../{mean,var}",
and "params/head/{kernel,bias}" for HF's classifier ("classifier.1.*").
"""

from __future__ import annotations

import re

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_EMBEDDER = re.compile(r"embedder\.embedder")
_UNIT = re.compile(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer\.(\d+))")
_LEAF = re.compile(r"(.+)\.(convolution\.weight"
                   r"|normalization\.(weight|bias|running_mean|running_var|num_batches_tracked))")


def conv_kernel(name: str, weight: np.ndarray, depthwise: bool = False) -> np.ndarray:
    """PyTorch conv weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O] (I = 1 for depthwise)."""
    if weight.ndim != 4 or (depthwise and weight.shape[1] != 1):
        want = "[channels, 1, kh, kw]" if depthwise else "[out, in, kh, kw]"
        raise ConvertError(f"tensor {name!r} has shape {list(weight.shape)}; a conv weight here is {want}")
    return np.ascontiguousarray(np.transpose(np.asarray(weight, np.float32), (2, 3, 1, 0)))


def batch_norm(tensors: dict[str, np.ndarray], prefix: str, path: str, channels: int) -> dict[str, np.ndarray]:
    """PyTorch BatchNorm `prefix`.{weight,bias,running_mean,running_var} -> flat params/batch_stats at `path`.

    Args:
      tensors: all checkpoint tensors.
      prefix: the BatchNorm module's tensor name prefix.
      path: its ftjax module path ("resnet/embedder/normalization").
      channels: the preceding conv's output channels, which every tensor must match.

    Returns:
      {"params/<path>/scale", "params/<path>/bias", "batch_stats/<path>/mean", "batch_stats/<path>/var"}.
    """
    out = {}
    for leaf, (collection, name) in _BN.items():
        key = f"{prefix}.{leaf}"
        if key not in tensors:
            raise ConvertError(f"tensor {key!r} is missing from the checkpoint")
        if tensors[key].shape != (channels,):
            raise ConvertError(f"tensor {key!r} has shape {list(tensors[key].shape)}; expected [{channels}] "
                               "(its conv's output channels)")
        out[f"{collection}/{path}/{name}"] = np.asarray(tensors[key], np.float32)
    return out


def linear_head(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """A classifier nn.Linear `prefix`.{weight [C, D], bias [C]} -> params/head/{kernel [D, C], bias}."""
    w, b = tensors.get(prefix + ".weight"), tensors.get(prefix + ".bias")
    if w is None and b is None:
        return {}
    if w is None or b is None:
        missing = prefix + (".weight" if w is None else ".bias")
        raise ConvertError(f"tensor {missing!r} is missing from the checkpoint's classifier")
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ConvertError(f"classifier {prefix!r} has weight {list(w.shape)} and bias {list(b.shape)}; "
                           "expected [classes, features] and [classes]")
    return {"params/head/kernel": np.ascontiguousarray(np.asarray(w, np.float32).T),
            "params/head/bias": np.asarray(b, np.float32)}


def _contiguous(indices, what: str) -> None:
    indices = sorted(set(indices))
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise ConvertError(f"the checkpoint has no tensors for {what} {missing[0]} (found {indices})")


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF ResNet(Model|ForImageClassification) tensors -> flat ftjax arrays.

    Args:
      tensors: {HF name: array}, with or without the "resnet." prefix.

    Returns:
      {"params/resnet/...": array, "batch_stats/resnet/...": array, maybe "params/head/...": array}.
    """
    units: dict[str, str] = {}  # tensor prefix -> ftjax module path
    blocks: dict[tuple[int, int], set[int]] = {}
    for name in tensors:
        if name.startswith("classifier."):
            if name not in ("classifier.1.weight", "classifier.1.bias"):
                raise ConvertError(f"unexpected tensor {name!r} in a ResNet checkpoint")
            continue
        inner = name[len("resnet."):] if name.startswith("resnet.") else name
        m = _LEAF.fullmatch(inner)
        unit = m and (_EMBEDDER.fullmatch(m.group(1)) or _UNIT.fullmatch(m.group(1)))
        if not unit:
            raise ConvertError(f"unexpected tensor {name!r} in a ResNet checkpoint; ftjax's ResNet map "
                               "does not know it")
        prefix = name[:len(name) - len(m.group(2)) - 1]
        if unit.re is _EMBEDDER:
            units[prefix] = "resnet/embedder"
            continue
        s, layer = int(unit.group(1)), int(unit.group(2))
        blocks.setdefault((s, layer), set())
        if unit.group(4) is None:
            units[prefix] = f"resnet/encoder/stages_{s}/layers_{layer}/shortcut"
        else:
            units[prefix] = f"resnet/encoder/stages_{s}/layers_{layer}/layer_{unit.group(4)}"
            blocks[(s, layer)].add(int(unit.group(4)))
    if "resnet/embedder" not in units.values():
        raise ConvertError("the checkpoint has no ResNet embedder (resnet.embedder.embedder.*): not a ResNet")
    _contiguous([s for s, _ in blocks], "ResNet stage")
    for s in {s for s, _ in blocks}:
        _contiguous([layer for t, layer in blocks if t == s], f"stage {s}'s layer")
    depths = {len(ks) for ks in blocks.values()}
    for (s, layer), ks in blocks.items():
        if len(depths) > 1 or len(ks) not in (2, 3):
            raise ConvertError(f"stage {s} layer {layer} has {len(ks)} convs; every block of a basic (2) or "
                               "bottleneck (3) ResNet has the same number")
        _contiguous(ks, f"stage {s} layer {layer}'s conv")
    out: dict[str, np.ndarray] = {}
    for prefix, path in units.items():
        key = prefix + ".convolution.weight"
        if key not in tensors:
            raise ConvertError(f"tensor {key!r} is missing from the checkpoint")
        kernel = conv_kernel(key, tensors[key])
        out[f"params/{path}/convolution/kernel"] = kernel
        out.update(batch_norm(tensors, prefix + ".normalization", path + "/normalization", kernel.shape[-1]))
    for (s, layer), ks in blocks.items():  # each block's convs must chain
        base = f"params/resnet/encoder/stages_{s}/layers_{layer}"
        for k in range(1, len(ks)):
            a, b = out[f"{base}/layer_{k - 1}/convolution/kernel"], out[f"{base}/layer_{k}/convolution/kernel"]
            if b.shape[2] != a.shape[3]:
                raise ConvertError(f"stage {s} layer {layer}: conv {k} takes {b.shape[2]} channels but conv "
                                   f"{k - 1} gives {a.shape[3]}")
    return {**out, **linear_head(tensors, "classifier.1")}
