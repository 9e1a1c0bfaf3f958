"""HF Llama / Mistral / Qwen2 tensor names -> ftjax Llama parameter paths, and back.

  HF (model. prefix optional)               ftjax (under llama/)
  embed_tokens                              word_embeddings/embedding
  layers.i.self_attn.{q,k,v,o}_proj         layer_i/self_attn/{q,k,v,o}_proj/{kernel,bias}
  layers.i.mlp.{gate,up,down}_proj          layer_i/mlp/{gate,up,down}_proj/{kernel,bias}
  layers.i.{input,post_attention}_layernorm layer_i/{input,post_attention}_layernorm/scale
  norm                                      norm/scale
  lm_head (outside "model.")                lm_head/kernel (absent when tied)

Linear weights are transposed (torch's [out, in] -> a kernel [in, out]). A tied model's file
has no lm_head.weight; one that has it equal to the embeddings is dropped by the family's
load hook (ftjax.models.llama.tied_head_load). Old checkpoints' rotary inv_freq buffers are
skipped (ftjax computes them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

FAMILY = "llama"
_LAYER = {  # HF module in a layer -> (ftjax module, kind)
    **{f"self_attn.{p}": (f"self_attn/{p}", "linear") for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{p}": (f"mlp/{p}", "linear") for p in ("gate_proj", "up_proj", "down_proj")},
    "input_layernorm": ("input_layernorm", "norm"),
    "post_attention_layernorm": ("post_attention_layernorm", "norm"),
}
_FIXED = {"embed_tokens": ("word_embeddings", "embed"), "norm": ("norm", "norm")}  # under "model."
# kind -> {HF leaf: (ftjax leaf, transpose)}
_LEAVES = {"linear": {"weight": ("kernel", True), "bias": ("bias", False)},
           "norm": {"weight": ("scale", False)},
           "embed": {"weight": ("embedding", False)}}
_SKIP = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def _put(out: dict[str, np.ndarray], module: str, kind: str, leaf: str, arr, name: str) -> None:
    if leaf not in _LEAVES[kind]:
        raise ConvertError(f"unknown tensor {name!r} in a Llama checkpoint (a {kind} has no {leaf!r})")
    ours, transpose = _LEAVES[kind][leaf]
    arr = np.asarray(arr)
    out[f"params/{FAMILY}/{module}/{ours}"] = np.ascontiguousarray(arr.T) if transpose else arr


def convert(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF LlamaForCausalLM (or Mistral / Qwen2) tensors -> flat ftjax params.

    Args:
      tensors: {HF name: array} in torch's layout; the "model." prefix is optional.

    Returns:
      {"params/llama/...": array}.

    Raises:
      ConvertError: an unknown tensor, a misshapen one, or layers that are not 0..n-1.
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        inner = name.removeprefix("model.")
        if _SKIP.fullmatch(name):
            continue
        if name == "lm_head.weight":
            _put(out, "lm_head", "linear", "weight", arr, name)
        elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", inner)) and m.group(1) in _FIXED:
            _put(out, *_FIXED[m.group(1)], m.group(2), arr, name)
        elif (m := re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", inner)) and m.group(2) in _LAYER:
            module, kind = _LAYER[m.group(2)]
            _put(out, f"layer_{int(m.group(1))}/{module}", kind, m.group(3), arr, name)
        else:
            raise ConvertError(f"unknown tensor {name!r} in a Llama checkpoint; ftjax's Llama name map does not "
                               "know it")
    return _check(out)


def _check(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    table = out.get(f"params/{FAMILY}/word_embeddings/embedding")
    if table is None or np.ndim(table) != 2:
        raise ConvertError("the checkpoint has no 2-D model.embed_tokens.weight: not a Llama model")
    found = {int(m.group(1)) for k in out if (m := re.match(rf"params/{FAMILY}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise ConvertError(f"the checkpoint's layers are {sorted(found)}, not 0..n-1")
    head = out.get(f"params/{FAMILY}/lm_head/kernel")
    if head is not None and np.shape(head) != table.T.shape:
        raise ConvertError(f"lm_head.weight has shape {list(np.shape(head.T))}, expected {list(table.shape)} "
                           "(the embeddings' [vocab, hidden])")
    return out


_FIXED_BY_PATH = {f"{ours}/{leaf}": (f"model.{hf}.{hf_leaf}", t) for hf, (ours, kind) in _FIXED.items()
                  for hf_leaf, (leaf, t) in _LEAVES[kind].items()}
_LAYER_BY_PATH = {f"{ours}/{leaf}": (f"{hf}.{hf_leaf}", t) for hf, (ours, kind) in _LAYER.items()
                  for hf_leaf, (leaf, t) in _LEAVES[kind].items()}


def to_hf(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ftjax Llama params -> HF LlamaForCausalLM tensors (the inverse of `convert`).

    A tied model gets no lm_head.weight (HF ties it, as save_pretrained writes it).

    Args:
      flat: flat params ("llama/...", no "params/" prefix) without method additions
        (LoRA and IA3 merged first).

    Returns:
      {HF tensor name: float32 array}, weights in torch's layout.

    Raises:
      ConvertError: a parameter with no place in an HF Llama checkpoint.
    """
    out = {}
    for path, arr in flat.items():
        inner = path.removeprefix(f"{FAMILY}/") if path.startswith(f"{FAMILY}/") else None
        layer = re.fullmatch(r"layer_(\d+)/(.+)", inner or "")
        if inner == "lm_head/kernel":
            name, transpose = "lm_head.weight", True
        elif inner in _FIXED_BY_PATH:
            name, transpose = _FIXED_BY_PATH[inner]
        elif layer and layer.group(2) in _LAYER_BY_PATH:
            hf, transpose = _LAYER_BY_PATH[layer.group(2)]
            name = f"model.layers.{layer.group(1)}.{hf}"
        else:
            raise ConvertError(f"parameter {path!r} has no place in an HF Llama checkpoint")
        arr = np.asarray(arr, np.float32)
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out
