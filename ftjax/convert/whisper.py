"""Whisper tensor names -> ftjax Whisper parameter paths, from HF or CTranslate2 names, and back to HF.

`convert` tells the naming by its keys: CTranslate2 variables ("encoder/conv1/weight",
fused "self_attention/linear_0" q|k|v, LayerNorm gamma/beta, settings as scalars), as
ftjax.convert.ctranslate2 reads them, or HF WhisperForConditionalGeneration tensors
("model.encoder.conv1.weight", the "model." prefix optional). Both give the same tree
(see ftjax/models/whisper.py):

  HF (model.)                          CTranslate2                         ftjax (under whisper/)
  encoder.conv{1,2}                    encoder/conv{1,2}                   encoder/conv{1,2}
  S.layers.i.self_attn.{q,k,v}_proj    S/layer_i/self_attention/linear_0   S/layer_i/attention/{query,key,value}
  S.layers.i.self_attn.out_proj        S/layer_i/self_attention/linear_1   S/layer_i/attention/out
  S.layers.i.self_attn_layer_norm      S/layer_i/self_attention/layer_norm S/layer_i/attention_LayerNorm
  decoder.layers.i.encoder_attn.q_proj decoder/layer_i/attention/linear_0  decoder/layer_i/cross_attention/query
  ...encoder_attn.{k,v}_proj           .../attention/linear_1 (k|v fused)  .../cross_attention/{key,value}
  ...encoder_attn.out_proj             .../attention/linear_2              .../cross_attention/out
  ...encoder_attn_layer_norm           .../attention/layer_norm            .../cross_attention_LayerNorm
  S.layers.i.fc1, fc2                  S/layer_i/ffn/linear_0, linear_1    S/layer_i/mlp/fc1, fc2
  S.layers.i.final_layer_norm          S/layer_i/ffn/layer_norm            S/layer_i/mlp_LayerNorm
  S.layer_norm                         S/layer_norm                        S/LayerNorm
  decoder.embed_tokens                 decoder/embeddings                  decoder/embed_tokens/embedding
  decoder.embed_positions              decoder/position_encodings          decoder/positions
(S: encoder or decoder; "..." the decoder layer's prefix.)

The encoder's position table (HF encoder.embed_positions, CT2 encoder/position_encodings)
goes to the non-trainable "constants" collection, constants/whisper/encoder/positions,
as the file stores it: CTranslate2 adds its float16-rounded table, so ftjax does too. The
output projection (HF proj_out, CT2
decoder/projection) must equal the token embeddings (tied). HF's k_proj has no bias: the
key biases load as zeros (CT2's fused k part is zero too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ftjax.convert.safetensors_io import ConvertError
from ftjax.models.whisper import sinusoids

ENCODER_POSITIONS = "constants/whisper/encoder/positions"
_ATTENTION = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "out"}
# HF module in a layer -> (ftjax module, kind); the encoder_attn ones are the decoder's only.
_HF_LAYER = {
    **{f"self_attn.{hf}": (f"attention/{ours}", "linear") for hf, ours in _ATTENTION.items()},
    **{f"encoder_attn.{hf}": (f"cross_attention/{ours}", "linear") for hf, ours in _ATTENTION.items()},
    "self_attn_layer_norm": ("attention_LayerNorm", "norm"),
    "encoder_attn_layer_norm": ("cross_attention_LayerNorm", "norm"),
    "final_layer_norm": ("mlp_LayerNorm", "norm"),
    "fc1": ("mlp/fc1", "linear"),
    "fc2": ("mlp/fc2", "linear"),
}
_HF_FIXED = {  # HF module (without "model.") -> (ftjax module, kind)
    "encoder.conv1": ("encoder/conv1", "conv"), "encoder.conv2": ("encoder/conv2", "conv"),
    "encoder.layer_norm": ("encoder/LayerNorm", "norm"), "decoder.layer_norm": ("decoder/LayerNorm", "norm"),
    "decoder.embed_tokens": ("decoder/embed_tokens", "embed"),
}
# kind -> {file leaf: (ftjax leaf, transpose the array?)}; conv weights go [out, in, k] -> [k, in, out]
_LEAVES = {"linear": {"weight": ("kernel", True), "bias": ("bias", False)},
           "conv": {"weight": ("kernel", True), "bias": ("bias", False)},
           "norm": {"weight": ("scale", False), "bias": ("bias", False)},
           "embed": {"weight": ("embedding", False)}}
_CT2_LEAVES = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}
# CT2 module in a layer -> (ftjax modules the rows split into, kind); "attention/*" is the decoder's only.
_CT2_LAYER = {
    "self_attention/linear_0": (("attention/query", "attention/key", "attention/value"), "linear"),
    "self_attention/linear_1": (("attention/out",), "linear"),
    "self_attention/layer_norm": (("attention_LayerNorm",), "norm"),
    "attention/linear_0": (("cross_attention/query",), "linear"),
    "attention/linear_1": (("cross_attention/key", "cross_attention/value"), "linear"),
    "attention/linear_2": (("cross_attention/out",), "linear"),
    "attention/layer_norm": (("cross_attention_LayerNorm",), "norm"),
    "ffn/linear_0": (("mlp/fc1",), "linear"),
    "ffn/linear_1": (("mlp/fc2",), "linear"),
    "ffn/layer_norm": (("mlp_LayerNorm",), "norm"),
}
_CT2_FIXED = {
    "encoder/conv1": ("encoder/conv1", "conv"), "encoder/conv2": ("encoder/conv2", "conv"),
    "encoder/layer_norm": ("encoder/LayerNorm", "norm"), "decoder/layer_norm": ("decoder/LayerNorm", "norm"),
    "decoder/embeddings": ("decoder/embed_tokens", "embed"),
}
# CT2 settings (scalars): the value ftjax's Whisper computes, or None: ignored (head counts go to
# the config; alignment heads are for timestamps; the alibi options matter only with alibi on).
_CT2_SETTINGS = {"decoder/pre_norm": 1, "decoder/activation": 3, "decoder/scale_embeddings": 0,
                 "decoder/start_from_zero_embedding": 0, "decoder/alibi": 0, "encoder/num_heads": None,
                 "decoder/num_heads": None, "decoder/alignment_heads": None, "decoder/alignment_layer": None,
                 "decoder/alibi_use_positive_positions": None, "decoder/scale_alibi": None}


def _transpose(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(2, 1, 0) if arr.ndim == 3 else arr.T)


def _put(out: dict[str, np.ndarray], module: str, kind: str, leaf: str, arr: np.ndarray, name: str) -> None:
    if leaf not in _LEAVES[kind]:
        raise ConvertError(f"unknown tensor {name!r} in a Whisper checkpoint (a {kind} has no {leaf!r})")
    ours, transpose = _LEAVES[kind][leaf]
    out[f"params/whisper/{module}/{ours}"] = _transpose(arr) if transpose else np.asarray(arr)


def _put_positions(out: dict[str, np.ndarray], name: str, arr: np.ndarray) -> None:
    """The file's encoder position table, as stored (its width is checked in `_complete`)."""
    if np.ndim(arr) != 2:
        raise ConvertError(f"{name} has shape {list(np.shape(arr))}; Whisper's encoder positions are "
                           "[max_source_positions, d_model]")
    out[ENCODER_POSITIONS] = np.asarray(arr, np.float32)


def _check_tied(name: str, arr: np.ndarray, tensors: Mapping[str, np.ndarray], embeddings: str) -> None:
    if embeddings in tensors and not np.array_equal(np.asarray(arr), np.asarray(tensors[embeddings])):
        raise ConvertError(f"{name} differs from {embeddings}: ftjax's Whisper ties the output projection to "
                           "the token embeddings and cannot load an untied one")


def _convert_hf(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefixed = any(k.startswith("model.") for k in tensors)
    embeddings = ("model." if prefixed else "") + "decoder.embed_tokens.weight"
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        inner = name.removeprefix("model.")
        if inner == "encoder.embed_positions.weight":
            _put_positions(out, name, arr)
        elif name == "proj_out.weight":
            _check_tied(name, arr, tensors, embeddings)
        elif inner == "decoder.embed_positions.weight":
            out["params/whisper/decoder/positions"] = np.asarray(arr)
        elif (m := re.fullmatch(r"(.+)\.(weight|bias)", inner)) and m.group(1) in _HF_FIXED:
            _put(out, *_HF_FIXED[m.group(1)], m.group(2), arr, name)
        elif ((m := re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", inner))
              and m.group(3) in _HF_LAYER and (m.group(1) == "decoder" or not m.group(3).startswith("encoder_attn"))):
            module, kind = _HF_LAYER[m.group(3)]
            _put(out, f"{m.group(1)}/layer_{int(m.group(2))}/{module}", kind, m.group(4), arr, name)
        else:
            raise ConvertError(f"unknown tensor {name!r} in an HF Whisper checkpoint; ftjax's Whisper name map "
                               "does not know it")
    return out


def _check_setting(name: str, value) -> None:
    want = _CT2_SETTINGS[name]
    if want is not None and int(np.asarray(value)) != want:
        raise ConvertError(f"the CTranslate2 model sets {name}={int(np.asarray(value))}; ftjax's Whisper "
                           f"computes {name}={want}")


def _put_ct2_layer(out: dict[str, np.ndarray], name: str, arr: np.ndarray, stack: str, layer: str,
                   module: str, leaf: str) -> None:
    targets, kind = _CT2_LAYER[module]
    parts = np.split(np.asarray(arr), len(targets), axis=0) if len(targets) > 1 else [arr]
    if len(targets) > 1 and arr.shape[0] % len(targets):
        raise ConvertError(f"{name} has {arr.shape[0]} rows, not {len(targets)} fused equal parts")
    for target, part in zip(targets, parts):
        _put(out, f"{stack}/layer_{int(layer)}/{target}", kind, _CT2_LEAVES[leaf], part, name)


def _convert_ct2(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if name in _CT2_SETTINGS:
            _check_setting(name, arr)
        elif name.endswith("_scale"):
            raise ConvertError(f"{name}: the CTranslate2 model is quantized (int8/int16); ftjax reads float32, "
                               "float16 or bfloat16 ones: convert it with --quantization float16")
        elif name == "encoder/position_encodings/encodings":
            _put_positions(out, name, arr)
        elif name == "decoder/projection/weight":
            _check_tied(name, arr, tensors, "decoder/embeddings/weight")
        elif name == "decoder/position_encodings/encodings":
            out["params/whisper/decoder/positions"] = np.asarray(arr)
        elif (m := re.fullmatch(r"(.+)/(weight|bias|gamma|beta)", name)) and m.group(1) in _CT2_FIXED:
            _put(out, *_CT2_FIXED[m.group(1)], _CT2_LEAVES[m.group(2)], arr, name)
        elif ((m := re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+)/(weight|bias|gamma|beta)", name))
              and m.group(3) in _CT2_LAYER and (m.group(1) == "decoder" or not m.group(3).startswith("attention/"))):
            _put_ct2_layer(out, name, arr, *m.groups())
        else:
            raise ConvertError(f"unknown variable {name!r} in a CTranslate2 Whisper model; ftjax's Whisper name "
                               "map does not know it")
    return out


def _layer_count(out: Mapping[str, np.ndarray], stack: str) -> int:
    found = {int(m.group(1)) for k in out if (m := re.match(rf"params/whisper/{stack}/layer_(\d+)/", k))}
    if found != set(range(len(found))):
        raise ConvertError(f"the checkpoint's {stack} layers are {sorted(found)}, not 0..n-1")
    return len(found)


def expected_shapes(d_model: int, n_mels: int, vocab: int, positions: int, encoder_ffn: int, decoder_ffn: int,
                    encoder_layers: int, decoder_layers: int) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Whisper with these sizes: flat "params/whisper/..." path -> shape."""
    d = d_model
    shapes = {"encoder/conv1/kernel": (3, n_mels, d), "encoder/conv1/bias": (d,), "encoder/conv2/kernel": (3, d, d),
              "encoder/conv2/bias": (d,), "decoder/embed_tokens/embedding": (vocab, d),
              "decoder/positions": (positions, d)}
    norm = lambda p: {f"{p}/scale": (d,), f"{p}/bias": (d,)}  # noqa: E731
    dense = lambda p, i, o: {f"{p}/kernel": (i, o), f"{p}/bias": (o,)}  # noqa: E731
    for stack, layers, ffn in (("encoder", encoder_layers, encoder_ffn), ("decoder", decoder_layers, decoder_ffn)):
        shapes.update(norm(f"{stack}/LayerNorm"))
        attentions = ("attention", "cross_attention") if stack == "decoder" else ("attention",)
        for i in range(layers):
            p = f"{stack}/layer_{i}"
            for a in attentions:
                shapes.update(norm(f"{p}/{a}_LayerNorm"))
                for proj in ("query", "key", "value", "out"):
                    shapes.update(dense(f"{p}/{a}/{proj}", d, d))
            shapes.update({**norm(f"{p}/mlp_LayerNorm"), **dense(f"{p}/mlp/fc1", d, ffn),
                           **dense(f"{p}/mlp/fc2", ffn, d)})
    return {f"params/whisper/{k}": v for k, v in shapes.items()}


def _complete(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds the zero key biases HF lacks; checks nothing is missing and every shape fits the others."""
    for path in [p for p in out if re.fullmatch(r".*attention/key/kernel", p)]:
        out.setdefault(path[:-len("kernel")] + "bias", np.zeros(out[path].shape[1], out[path].dtype))
    for needed in ("params/whisper/decoder/embed_tokens/embedding", "params/whisper/encoder/conv1/kernel",
                   "params/whisper/decoder/positions", ENCODER_POSITIONS):
        if needed not in out:
            raise ConvertError(f"the checkpoint has no {needed.split('/', 2)[2]}: not a complete Whisper model")
    vocab, d = out["params/whisper/decoder/embed_tokens/embedding"].shape
    if out[ENCODER_POSITIONS].shape[1] != d:
        raise ConvertError(f"the encoder positions have shape {list(out[ENCODER_POSITIONS].shape)}, expected "
                           f"[max_source_positions, {d}] for a Whisper of width {d}")
    ffn = lambda s: out.get(f"params/whisper/{s}/layer_0/mlp/fc1/kernel", np.zeros((0, 0))).shape[1]  # noqa: E731
    want = expected_shapes(d, out["params/whisper/encoder/conv1/kernel"].shape[1], vocab,
                           out["params/whisper/decoder/positions"].shape[0], ffn("encoder"), ffn("decoder"),
                           _layer_count(out, "encoder"), _layer_count(out, "decoder"))
    missing = sorted(set(want) - set(out))
    if missing:
        raise ConvertError(f"the Whisper checkpoint lacks {len(missing)} tensors, e.g. "
                           f"{missing[0][len('params/whisper/'):]}")
    for path, shape in want.items():
        if tuple(out[path].shape) != shape:
            raise ConvertError(f"{path[len('params/'):]} has shape {list(out[path].shape)}, expected {list(shape)} "
                               f"for a Whisper of width {d}")
    return out


def is_ct2(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether the names are CTranslate2's ("encoder/...", "decoder/...") rather than HF's."""
    return any(k.startswith(("encoder/", "decoder/")) for k in tensors)


def convert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF or CTranslate2 Whisper tensors -> flat ftjax variables.

    Args:
      tensors: {name: array} of one checkpoint: HF WhisperForConditionalGeneration names
        (torch layout), or CTranslate2 variable names (aliases resolved, float32).

    Returns:
      {"params/whisper/...": array, "constants/whisper/encoder/positions": the file's
      encoder position table [max_source_positions, d_model] float32}.

    Raises:
      ConvertError: an unknown or missing tensor, a shape that does not fit, an
        untied output projection or a CTranslate2 setting ftjax's Whisper does not
        compute (one line).
    """
    if not tensors:
        raise ConvertError("the checkpoint holds no tensors")
    return _complete(_convert_ct2(tensors) if is_ct2(tensors) else _convert_hf(tensors))


_HF_FIXED_BY_PATH = {ours: ("model." + hf, kind) for hf, (ours, kind) in _HF_FIXED.items()}
_HF_LAYER_BY_PATH = {ours: (hf, kind) for hf, (ours, kind) in _HF_LAYER.items()}


def _hf_name(path: str) -> tuple[str, bool] | None:
    """One ftjax path (without "params/") -> (HF name, transpose?); None for a key bias (dropped)."""
    if path == "whisper/decoder/positions":
        return "model.decoder.embed_positions.weight", False
    fixed = re.fullmatch(r"whisper/(.+)/(\w+)", path)
    layer = re.fullmatch(r"whisper/(encoder|decoder)/layer_(\d+)/(.+)/(\w+)", path)
    if fixed and fixed.group(1) in _HF_FIXED_BY_PATH:
        (hf, kind), leaf = _HF_FIXED_BY_PATH[fixed.group(1)], fixed.group(2)
    elif layer and layer.group(3) in _HF_LAYER_BY_PATH and (layer.group(1) == "decoder"
                                                           or not layer.group(3).startswith("cross_")):
        stack, i, module, leaf = layer.groups()
        if module.endswith("attention/key") and leaf == "bias":
            return None
        hf, kind = _HF_LAYER_BY_PATH[module]
        hf = f"model.{stack}.layers.{i}.{hf}"
    else:
        hf, kind, leaf = "", "", ""
    found = [(f"{hf}.{hf_leaf}", t) for hf_leaf, (ours, t) in _LEAVES.get(kind, {}).items() if ours == leaf]
    if not found:
        raise ConvertError(f"parameter {path!r} has no place in an HF Whisper checkpoint")
    return found[0]


def to_hf(flat: dict[str, np.ndarray], max_source_positions: int = 1500) -> dict[str, np.ndarray]:
    """ftjax Whisper params -> HF WhisperForConditionalGeneration tensors (the inverse of `convert`).

    The key biases are dropped (HF's k_proj has none; they change no output), the encoder
    positions are written as the computed float32 sinusoid (HF's own init; the params
    carry no table), and proj_out is left to HF's tying, as
    `save_pretrained` does.

    Args:
      flat: flat params ("whisper/...", no "params/" prefix) without method additions
        (LoRA and IA3 merged first).
      max_source_positions: the config's, for the encoder's sinusoid table.

    Returns:
      {HF tensor name: float32 array}, weights in torch's layout.

    Raises:
      ConvertError: a parameter with no place in an HF Whisper checkpoint.
    """
    out = {}
    for path, arr in flat.items():
        target = _hf_name(path)
        if target is None:
            continue
        name, transpose = target
        arr = np.asarray(arr, np.float32)
        out[name] = _transpose(arr) if transpose else np.ascontiguousarray(arr)
    if "whisper/decoder/embed_tokens/embedding" not in flat:
        raise ConvertError("the params have no whisper/decoder/embed_tokens/embedding: not a Whisper model")
    width = np.shape(flat["whisper/decoder/embed_tokens/embedding"])[1]
    out["model.encoder.embed_positions.weight"] = sinusoids(max_source_positions, width)
    return out


def to_hf_state(flat_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model state's HF tensors: the encoder position table the model used (a float16
    checkpoint's rounded table stays as it was), replacing `to_hf`'s computed one.

    Args:
      flat_state: flat non-param collections ("constants/whisper/encoder/positions").
    """
    table = flat_state.get("constants/whisper/encoder/positions")
    return {} if table is None else {"model.encoder.embed_positions.weight": np.asarray(table, np.float32)}
