"""A torch-free reader of GGUF files (llama.cpp's one-file format): config, weights, tokenizer.

A GGUF file holds a decoder LM whole: config and tokenizer as metadata, tensors (often
block-quantized) under llama.cpp's names. The header is parsed here, every length checked
against the bytes that remain before anything is read; tensors are dequantized by the
`gguf` package (`gguf.quants.dequantize`). What the rest of ftjax gets, as from an HF
snapshot: `hf_config` (a LlamaForCausalLM config.json dict), `read(path).tensors` ({HF
name: array}, llama.cpp's rotary row permutation of q/k undone, as transformers' GGUF
loader does), `hf_tokenizer` (transformers' torch-free GGUF tokenizer builders) and
`materialize` (config.json + tokenizer files + a link to the GGUF, in one folder).

Layout (versions 2 and 3, little-endian):

  "GGUF"; u32 version; u64 n_tensors; u64 n_kv;
  n_kv x (str key; u32 value type; value);
  n_tensors x (str name; u32 n_dims; u64 dims[n_dims], fastest-moving first; u32 ggml type;
               u64 offset into the data section);
  padding to `general.alignment` (default 32); the data section.

where a str is a u64 byte count + UTF-8 bytes, and value types are 0 u8, 1 i8, 2 u16,
3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 str, 9 array (u32 item type, u64 count, items),
10 u64, 11 i64, 12 f64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import pathlib
import shutil
import struct
from typing import Any

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHITECTURES = ("llama",)
# The ggml tensor types read here: gguf.quants dequantizes each of them with numpy.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                   "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0")
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4  # arrays of arrays in the metadata
_VERSION_OF_OUTPUT = "1"  # bump when materialize's files change

# GGUF name -> HF LlamaForCausalLM name. Per block, "blk.{i}." becomes "model.layers.{i}.".
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when tied to the embedding
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# value type id -> struct format (fixed-size scalars)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: name, numpy-order shape, ggml type name, absolute byte range."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    start: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Header:
    """A GGUF file's metadata and tensor table (no tensor data)."""

    path: pathlib.Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


@dataclasses.dataclass
class GGUFModel:
    """What `read` returns.

    Attributes:
      config: the HF config.json dict (see `hf_config`).
      tensors: HF name -> dequantized array ([out, in] for projections, as HF stores them).
      types: HF name -> the ggml type the tensor was stored as ("Q4_1", "F32", ...).
      metadata: the file's metadata, key -> value.
    """

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    types: dict[str, str]
    metadata: dict[str, Any]


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def find_gguf(folder: str | os.PathLike) -> pathlib.Path | None:
    """The one *.gguf file of `folder`, or None; several are an error (which one is the model?)."""
    files = sorted(pathlib.Path(folder).glob("*.gguf"))
    if len(files) > 1:
        raise ConvertError(f"{folder} has several GGUF files ({', '.join(f.name for f in files)}); "
                           "keep one, or point at a folder holding only the one to use")
    return files[0] if files else None


class _Cursor:
    """Reads little-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf, path: pathlib.Path):
        self.buf, self.path, self.pos = buf, path, 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        """Skips `n` bytes; returns where they start."""
        if n > self.left():
            raise ConvertError(f"{self.path} is truncated or corrupt: {what} needs {n} bytes at offset {self.pos}, "
                               f"{self.left()} left (an incomplete download?)")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"{self.path}: {what} at offset {start} is not UTF-8; the file is corrupt") from None

    def value(self, type_id: int, what: str, depth: int = 0):
        if type_id in _SCALARS:
            return self.unpack(_SCALARS[type_id], what)
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY and depth < _MAX_NESTING:
            item_type, count = self.unpack("I", what), self.unpack("Q", what)
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype("<" + _SCALARS[item_type])
                start = self.take(count * dtype.itemsize, what)
                return np.frombuffer(self.buf[start:start + count * dtype.itemsize], dtype).tolist()
            if count * (8 if item_type in (_STRING, _ARRAY) else 1) > self.left():  # each item takes this much
                self.take(count, what)  # raises the truncation error
            return [self.value(item_type, what, depth + 1) for _ in range(count)]
        if type_id == _ARRAY:
            raise ConvertError(f"{self.path}: {what} nests arrays deeper than {_MAX_NESTING}; the file is corrupt")
        raise ConvertError(f"{self.path}: {what} has value type {type_id}, which GGUF does not define; "
                           "the file is corrupt")


def read_header(path: str | os.PathLike) -> Header:
    """Parses a GGUF file's metadata and tensor table, validating every length and range.

    Args:
      path: the .gguf file.

    Returns:
      Its Header.

    Raises:
      ConvertError: not a GGUF file, an unsupported version or endianness, a truncated or
        corrupt header, a tensor of an unknown type or whose data lies past the file's end.
    """
    import gguf

    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, gguf)
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        if not path.is_file():
            raise ConvertError(f"GGUF file {path} does not exist") from None
        if path.stat().st_size < 24:
            raise ConvertError(f"{path} is truncated: {path.stat().st_size} bytes, too short for a GGUF header") from None
        raise ConvertError(f"cannot read {path}: {' '.join(str(e).split())}") from None


def _parse(buf, path: pathlib.Path, gguf) -> Header:
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != MAGIC:
        raise ConvertError(f"{path} is not a GGUF file (its first bytes are {bytes(buf[:4])!r}, not b'GGUF')")
    cur.take(4, "the magic")
    version = cur.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise ConvertError(f"{path} is a big-endian GGUF file; ftjax reads little-endian ones (llama.cpp's default)")
        raise ConvertError(f"{path} is GGUF version {version}; ftjax reads versions "
                           f"{', '.join(map(str, SUPPORTED_VERSIONS))} (re-convert it with a current llama.cpp)")
    n_tensors, n_kv = cur.unpack("Q", "the tensor count"), cur.unpack("Q", "the metadata count")
    if n_kv * 12 > cur.left() or n_tensors * 24 > cur.left():  # the least each entry takes
        raise ConvertError(f"{path} is truncated or corrupt: its header announces {n_kv} metadata entries and "
                           f"{n_tensors} tensors, more than its {len(buf)} bytes can hold")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        metadata[key] = cur.value(cur.unpack("I", f"the type of {key!r}"), f"metadata {key!r}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ConvertError(f"{path}: general.alignment={alignment!r} is not a power of two; the file is corrupt")
    entries = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.unpack("I", f"the rank of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ConvertError(f"{path}: tensor {name!r} has rank {n_dims} (GGUF allows 1 to {_MAX_DIMS}); "
                               "the file is corrupt")
        dims = [cur.unpack("Q", f"the shape of {name!r}") for _ in range(n_dims)]
        type_id, offset = cur.unpack("I", f"the type of {name!r}"), cur.unpack("Q", f"the offset of {name!r}")
        entries.append((name, dims, type_id, offset))
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in entries:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ConvertError(f"{path}: tensor {name!r} has ggml type id {type_id}, which the installed gguf "
                               "package does not know (a newer format: pip install -U gguf; or a corrupt file)"
                               ) from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if min(dims) < 1 or dims[0] % block:
            raise ConvertError(f"{path}: tensor {name!r} has shape {dims[::-1]}, which {qtype.name} blocks of "
                               f"{block} cannot hold; the file is corrupt")
        nbytes = math.prod(dims) // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ConvertError(f"{path} is truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, "
                               f"the file has {len(buf)} (an incomplete download?)")
        if name in tensors:
            raise ConvertError(f"{path}: tensor {name!r} appears twice; the file is corrupt")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype.name, start, nbytes)
    return Header(path, version, metadata, tensors)


def _architecture(header: Header) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        shown = repr(arch) if isinstance(arch, str) else "(none)"
        raise ConvertError(f"GGUF architecture {shown} is not supported (supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}): {header.path}")
    return arch


def _get(header: Header, key: str, kind: type, default: Any = None, least: int = 1) -> Any:
    """Metadata `key` (or `default`), checked to be a `kind` (ints at least `least`)."""
    value = header.metadata.get(key, default)
    if value is None:
        raise ConvertError(f"{header.path} lacks the metadata {key!r}; the file is incomplete")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < least):
        raise ConvertError(f"{header.path}: metadata {key}={value!r} is not a valid {kind.__name__}")
    return value


def hf_config(header: Header) -> dict[str, Any]:
    """The HF config.json dict (LlamaForCausalLM) that a llama GGUF's metadata describes.

    Refuses what ftjax's Llama does not compute: RoPE scaling, mixtures of experts, a
    rotary dimension other than the head size.
    """
    arch = _architecture(header)
    hidden, heads = _get(header, f"{arch}.embedding_length", int), _get(header, f"{arch}.attention.head_count", int)
    kv_heads = _get(header, f"{arch}.attention.head_count_kv", int, heads)
    if f"{arch}.attention.key_length" not in header.metadata and hidden % heads or heads % kv_heads:
        raise ConvertError(f"{header.path}: {heads} attention heads do not divide the width {hidden}, or do not "
                           f"share {kv_heads} key/value heads evenly; the metadata is corrupt")
    head_dim = _get(header, f"{arch}.attention.key_length", int, hidden // heads)
    for key, value in ((f"{arch}.attention.value_length", head_dim), (f"{arch}.rope.dimension_count", head_dim)):
        if _get(header, key, int, value) != head_dim:
            raise ConvertError(f"{header.path}: metadata {key}={header.metadata[key]} differs from the head size "
                               f"{head_dim}; ftjax's Llama rotates and projects whole heads")
    theta = _get(header, f"{arch}.rope.freq_base", float, 10000.0)
    rope, scaling = {"rope_type": "default", "rope_theta": theta}, header.metadata.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=_get(header, f"{arch}.rope.scaling.factor", float))
    elif scaling not in (None, "none") or "rope_freqs.weight" in header.tensors:  # llama3's is a tensor of factors
        what = f"{arch}.rope.scaling.type={scaling!r}" if scaling else "the rope_freqs.weight tensor"
        raise ConvertError(f"{header.path} uses RoPE scaling ({what}), which ftjax's GGUF reader does not support "
                           "(it reads linear scaling)")
    if header.metadata.get(f"{arch}.expert_count", 0):
        raise ConvertError(f"{header.path} is a mixture of experts ({arch}.expert_count="
                           f"{header.metadata[f'{arch}.expert_count']}); ftjax's GGUF reader reads dense models")
    if "token_embd.weight" not in header.tensors:
        raise ConvertError(f"{header.path} lacks the tensor 'token_embd.weight' (model.embed_tokens.weight)")
    vocab = _get(header, f"{arch}.vocab_size", int, header.tensors["token_embd.weight"].shape[0])
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": _get(header, f"{arch}.feed_forward_length", int),
        "num_hidden_layers": _get(header, f"{arch}.block_count", int),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": _get(header, f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": theta, "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if scaling == "linear" else None,
        "max_position_embeddings": _get(header, f"{arch}.context_length", int),
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": "output.weight" not in header.tensors,
        "torch_dtype": "float32",
    }
    if config["num_hidden_layers"] * len(BLOCK_NAMES) > len(header.tensors):  # before anything loops over them
        raise ConvertError(f"{header.path}: metadata {arch}.block_count={config['num_hidden_layers']} needs "
                           f"{len(BLOCK_NAMES)} tensors a block; the file holds {len(header.tensors)} in all")
    for name in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
        if key in header.metadata:
            config[f"{name}_token_id"] = _get(header, key, int, least=0)
    return config


def _hf_name(name: str, layers: int) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < layers:
        leaf = BLOCK_NAMES.get(parts[2])
        return f"model.layers.{int(parts[1])}.{leaf}" if leaf else None
    return None


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape ([out, in] for projections) of every tensor a llama GGUF must hold."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    block = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
             "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
             "mlp.down_proj.weight": (h, i)}
    for n in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{n}.{k}": s for k, s in block.items()})
    return shapes


def gguf_name(hf_name: str) -> str:
    """The GGUF name of an HF tensor name (the inverse of the name maps)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf_name:
            return g
    _, _, n, leaf = hf_name.split(".", 3)
    return f"blk.{n}.{next(g for g, h in BLOCK_NAMES.items() if h == leaf)}"


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion of HF q/k rows: per head, interleaves the two rotary halves (its `permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF q/k rows back to HF's half-split rotary layout (transformers' `_reverse_permute_weights`)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path: str | os.PathLike, dtype=np.float32) -> GGUFModel:
    """Reads a llama GGUF file into an HF config and dequantized, HF-named tensors.

    Args:
      path: the .gguf file.
      dtype: the numpy dtype of the returned tensors.

    Returns:
      A GGUFModel.

    Raises:
      ConvertError: an architecture other than llama, a tensor type the reader does not
        support, a missing, unknown or misshapen tensor, a truncated or corrupt file.
    """
    import gguf

    header = read_header(path)
    config = hf_config(header)
    expected = expected_shapes(config)
    names: dict[str, TensorInfo] = {}
    for info in header.tensors.values():
        hf = _hf_name(info.name, config["num_hidden_layers"])
        if hf is None:
            raise ConvertError(f"{header.path}: tensor {info.name!r} has no place in ftjax's llama name map "
                               "(a llama variant ftjax does not read)")
        if info.type_name not in SUPPORTED_TYPES:
            raise ConvertError(f"{header.path}: tensor {info.name!r} is stored as {info.type_name}, which ftjax's "
                               f"GGUF reader does not support (supported: {', '.join(SUPPORTED_TYPES)})")
        if info.shape != expected[hf]:
            raise ConvertError(f"{header.path}: tensor {info.name!r} ({hf}) has shape {list(info.shape)}, the "
                               f"config needs {list(expected[hf])}")
        names[hf] = info
    missing = [n for n in expected if n not in names]
    if missing:
        raise ConvertError(f"{header.path} lacks {len(missing)} tensor(s) the config needs, e.g. "
                           f"{gguf_name(missing[0])!r} ({missing[0]}); the file is incomplete")
    tensors: dict[str, np.ndarray] = {}
    with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for hf, info in names.items():
            qtype = gguf.GGMLQuantizationType[info.type_name]
            raw = np.frombuffer(mm[info.start:info.start + info.nbytes], np.uint8)
            w = gguf.quants.dequantize(raw.reshape(gguf.quant_shape_to_byte_shape(info.shape, qtype)), qtype)
            if hf.endswith("q_proj.weight"):
                w = unpermute_rotary(w, config["num_attention_heads"])
            elif hf.endswith("k_proj.weight"):
                w = unpermute_rotary(w, config["num_key_value_heads"])
            tensors[hf] = np.ascontiguousarray(w, dtype=dtype)
    return GGUFModel(config, tensors, {hf: info.type_name for hf, info in names.items()}, header.metadata)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF config.json dict of a llama GGUF file (metadata only; no tensor is read)."""
    return hf_config(read_header(path))


_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def hf_tokenizer(header: Header):
    """The transformers fast tokenizer a GGUF file's metadata describes, built without torch.

    The steps of transformers' own `get_gguf_tokenizer` (whose file reader imports torch)
    on this module's reader, then transformers' torch-free `convert_gguf_tokenizer`.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:
        import transformers

        raise ConvertError(f"building the tokenizer of {header.path} needs transformers' GGUF tokenizer builders "
                           f"(transformers.integrations.gguf, transformers 5.24 has them); transformers "
                           f"{transformers.__version__} lacks them ({' '.join(str(e).split())}): "
                           "pip install -U 'transformers>=5.24,<6'") from None
    from transformers import PreTrainedTokenizerFast

    meta = header.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ConvertError(f"{header.path} holds no tokenizer (no tokenizer.ggml.tokens list in its metadata)")
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    kind = tokenizer_dict.get("tokenizer_type")
    if kind == "llama":  # as transformers: llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
        tokenizer_config.setdefault("add_bos_token", True)
    elif kind == "gemma4":
        tokenizer_config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
            raise ConvertError(f"{header.path}: tokenizer.ggml.{key}={token_id!r} is not a token of its "
                               f"{len(tokens)}-token vocabulary")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(header.metadata.get("general.architecture"), tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
    except Exception as e:  # noqa: BLE001 - the builders raise ValueError, KeyError, Rust errors
        raise ConvertError(f"cannot build the tokenizer of {header.path}: {' '.join(str(e).split())[:300]}") from None


def write_tokenizer(header: Header, out_dir: str | os.PathLike) -> None:
    """Writes tokenizer.json and tokenizer_config.json (chat template, special tokens) into `out_dir`."""
    tok = hf_tokenizer(header)
    out = pathlib.Path(out_dir)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": header.metadata.get(f"{header.metadata.get('general.architecture')}.context_length")}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        config[key] = getattr(tok, key)
    for key in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{key}" in header.metadata:
            config[key] = bool(header.metadata[f"tokenizer.ggml.{key}"])
    if isinstance(header.metadata.get("tokenizer.chat_template"), str):
        config["chat_template"] = header.metadata["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def materialize(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """An HF-like folder for a GGUF file: config.json, tokenizer.json, tokenizer_config.json, and a link.

    The link (a symlink, else a hard link) has the GGUF's file name, so the folder reads
    as an HF snapshot whose weights are the GGUF (`ftjax.convert.read_weights`).

    Args:
      gguf_path: the .gguf file.
      out_dir: where to write; None: a folder in the ftjax cache keyed by the file's path,
        size and modification time (reused while those stay the same).

    Returns:
      The folder.
    """
    from ftjax import assets

    src = pathlib.Path(gguf_path).resolve()
    if out_dir is not None:  # the caller's folder: written in place, nothing else in it touched
        header = read_header(src)
        config = hf_config(header)
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_folder(header, config, out)
        return out
    if not src.is_file():
        raise ConvertError(f"GGUF file {src} does not exist")
    st = src.stat()
    key = hashlib.sha256(f"{_VERSION_OF_OUTPUT}|{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    out = assets.cache_dir() / "gguf" / key
    if (out / "tokenizer.json").is_file():
        return out
    header = read_header(src)
    config = hf_config(header)
    tmp = out.parent / f"{out.name}.tmp{os.getpid()}"  # staged, then renamed: a reader never sees half of it
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError:  # a read-only cache costs time, not correctness
        import tempfile

        out = pathlib.Path(tempfile.mkdtemp(prefix="ftjax-gguf-"))
        _write_folder(header, config, out)
        return out
    _write_folder(header, config, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "tokenizer.json").is_file():
            raise
    return out


def _write_folder(header: Header, config: dict[str, Any], out: pathlib.Path) -> None:
    src = header.path
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(header, out)
    link = out / src.name
    if link.exists() and link.resolve() == src:
        return
    link.unlink(missing_ok=True)
    try:
        link.symlink_to(src)
    except OSError:
        try:
            os.link(src, link)
        except OSError as e:
            raise ConvertError(f"cannot link {src} into {out}: {' '.join(str(e).split())}") from None
