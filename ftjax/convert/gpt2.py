"""HF GPT-2 tensor names -> ftjax GPT-2 parameter paths, and back.

  HF (transformer. prefix optional)   ftjax (under gpt2/)
  wte, wpe                            word_embeddings/embedding, position_embeddings/embedding
  h.i.ln_1, h.i.ln_2                  layer_i/ln_1, layer_i/ln_2 ({scale,bias})
  h.i.attn.c_attn, h.i.attn.c_proj    layer_i/attn/c_attn, layer_i/attn/c_proj ({kernel,bias})
  h.i.mlp.c_fc, h.i.mlp.c_proj        layer_i/mlp/c_fc, layer_i/mlp/c_proj
  ln_f                                ln_f
  lm_head (outside "transformer.")    lm_head/kernel (absent when tied)

GPT-2's Conv1D weights are stored [in, out] already: they load untransposed (lm_head, a
torch Linear, is transposed). The causal-mask buffers of older files (h.i.attn.bias,
h.i.attn.masked_bias) are skipped. A tied model's lm_head equal to wte is dropped by the
family's load hook.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

FAMILY = "gpt2"
_LAYER = {"ln_1": ("ln_1", "norm"), "ln_2": ("ln_2", "norm"), "attn.c_attn": ("attn/c_attn", "conv1d"),
          "attn.c_proj": ("attn/c_proj", "conv1d"), "mlp.c_fc": ("mlp/c_fc", "conv1d"),
          "mlp.c_proj": ("mlp/c_proj", "conv1d")}
_FIXED = {"wte": ("word_embeddings", "embed"), "wpe": ("position_embeddings", "embed"), "ln_f": ("ln_f", "norm")}
# kind -> {HF leaf: (ftjax leaf, transpose)}
_LEAVES = {"conv1d": {"weight": ("kernel", False), "bias": ("bias", False)},
           "norm": {"weight": ("scale", False), "bias": ("bias", False)},
           "embed": {"weight": ("embedding", False)}}
_SKIP = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def _put(out: dict[str, np.ndarray], module: str, kind: str, leaf: str, arr, name: str) -> None:
    if leaf not in _LEAVES[kind]:
        raise ConvertError(f"unknown tensor {name!r} in a GPT-2 checkpoint (a {kind} has no {leaf!r})")
    ours, _ = _LEAVES[kind][leaf]
    out[f"params/{FAMILY}/{module}/{ours}"] = np.asarray(arr)


def convert(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel (or GPT2Model) tensors -> flat ftjax params.

    Args:
      tensors: {HF name: array}; the "transformer." prefix is optional.

    Returns:
      {"params/gpt2/...": array}.

    Raises:
      ConvertError: an unknown tensor, a misshapen lm_head, or layers that are not 0..n-1.
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        inner = name.removeprefix("transformer.")
        if _SKIP.fullmatch(inner):
            continue
        if name == "lm_head.weight":
            out[f"params/{FAMILY}/lm_head/kernel"] = np.ascontiguousarray(np.asarray(arr).T)
        elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", inner)) and m.group(1) in _FIXED:
            _put(out, *_FIXED[m.group(1)], m.group(2), arr, name)
        elif (m := re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", inner)) and m.group(2) in _LAYER:
            module, kind = _LAYER[m.group(2)]
            _put(out, f"layer_{int(m.group(1))}/{module}", kind, m.group(3), arr, name)
        else:
            raise ConvertError(f"unknown tensor {name!r} in a GPT-2 checkpoint; ftjax's GPT-2 name map does not "
                               "know it")
    table = out.get(f"params/{FAMILY}/word_embeddings/embedding")
    if table is None or np.ndim(table) != 2:
        raise ConvertError("the checkpoint has no 2-D wte.weight: not a GPT-2 model")
    found = {int(m.group(1)) for k in out if (m := re.match(rf"params/{FAMILY}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise ConvertError(f"the checkpoint's layers are {sorted(found)}, not 0..n-1")
    head = out.get(f"params/{FAMILY}/lm_head/kernel")
    if head is not None and np.shape(head) != table.T.shape:
        raise ConvertError(f"lm_head.weight has shape {list(np.shape(head.T))}, expected {list(table.shape)} "
                           "(wte's [vocab, n_embd])")
    return out


_FIXED_BY_PATH = {f"{ours}/{leaf}": f"transformer.{hf}.{hf_leaf}" for hf, (ours, kind) in _FIXED.items()
                  for hf_leaf, (leaf, _) in _LEAVES[kind].items()}
_LAYER_BY_PATH = {f"{ours}/{leaf}": f"{hf}.{hf_leaf}" for hf, (ours, kind) in _LAYER.items()
                  for hf_leaf, (leaf, _) in _LEAVES[kind].items()}


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax GPT-2 params -> HF GPT2LMHeadModel tensors (the inverse of `convert`).

    A tied model gets no lm_head.weight (HF ties it, as save_pretrained writes it).

    Args:
      flat: flat params ("gpt2/...", no "params/" prefix) without method additions
        (LoRA and IA3 merged first).

    Returns:
      {HF tensor name: float32 array}, Conv1D weights [in, out] as GPT-2 stores them.

    Raises:
      ConvertError: a parameter with no place in an HF GPT-2 checkpoint.
    """
    out = {}
    for path, arr in flat.items():
        inner = path.removeprefix(f"{FAMILY}/") if path.startswith(f"{FAMILY}/") else None
        layer = re.fullmatch(r"layer_(\d+)/(.+)", inner or "")
        arr = np.asarray(arr, np.float32)
        if inner == "lm_head/kernel":
            name, arr = "lm_head.weight", arr.T
        elif inner in _FIXED_BY_PATH:
            name = _FIXED_BY_PATH[inner]
        elif layer and layer.group(2) in _LAYER_BY_PATH:
            name = f"transformer.h.{layer.group(1)}.{_LAYER_BY_PATH[layer.group(2)]}"
        else:
            raise ConvertError(f"parameter {path!r} has no place in an HF GPT-2 checkpoint")
        out[name] = np.ascontiguousarray(arr)
    return out
