"""A reader of CTranslate2 `model.bin` files (faster-whisper folders) without torch or ctranslate2.

A CTranslate2 model folder holds `model.bin`, CTranslate2's own `config.json` (generation
facts, no model_type) and the tokenizer (`tokenizer.json`, `vocabulary.txt`). `model.bin`
is little-endian; binary versions 5 and 6 (the ones current converters write) share this
layout:

  u32 version; str spec name ("WhisperSpec"); u32 spec revision; u32 n_vars;
  n_vars x (str name; u8 rank; u32 dims[rank]; u8 dtype; u32 nbytes; nbytes raw bytes);
  u32 n_aliases; n_aliases x (str alias; str target)

where a str is `u16 length` (counting a final NUL) + that many bytes, and dtype is
0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Scalars (rank 0) carry the
spec's settings: head counts, flags such as pre_norm, the activation as an enum.
Every length is checked against the bytes that remain before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import pathlib
import re
import struct
from typing import Any

import numpy as np

from ftjax.convert.safetensors_io import ConvertError

SUPPORTED_VERSIONS = (5, 6)
WHISPER_REVISION = 3  # WhisperSpec's weights layout that the names below follow
# dtype id -> (name, wire dtype, item size)
_DTYPES = {0: ("float32", "<f4", 4), 1: ("int8", "<i1", 1), 2: ("int16", "<i2", 2), 3: ("int32", "<i4", 4),
           4: ("float16", "<f2", 2), 5: ("bfloat16", "<u2", 2)}
_ACTIVATIONS = {0: "relu", 1: "gelu (tanh approximation)", 2: "swish", 3: "gelu", 4: "gelu (sigmoid)",
                5: "tanh", 6: "sigmoid"}
# Whisper's decoder settings: the value ftjax's model computes (absent: CTranslate2's default applies)
_WHISPER_FLAGS = {"decoder/pre_norm": 1, "decoder/activation": 3, "decoder/scale_embeddings": 0,
                  "decoder/start_from_zero_embedding": 0, "decoder/alibi": 0}
# head counts are read; alignment is for timestamps; the ALiBi settings matter only with alibi=1
_WHISPER_IGNORED = {"encoder/num_heads", "decoder/num_heads", "decoder/alignment_heads",
                    "decoder/alignment_layer", "decoder/alibi_use_positive_positions", "decoder/scale_alibi"}


@dataclasses.dataclass
class Ct2Model:
    """The contents of a model.bin.

    Attributes:
      spec: the spec name, e.g. "WhisperSpec" or "TransformerSpec".
      revision: the spec revision (the weights layout version of that spec).
      variables: name -> array (float16/bfloat16 as float32; scalars as numpy scalars),
        aliases included (the alias maps to its target's array).
      aliases: alias name -> target name.
      binary_version: the file's format version.
    """

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    binary_version: int = 6


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class _Header:
    version: int
    spec: str
    revision: int
    entries: list[_Entry]
    aliases: dict[str, str]


class _Cursor:
    """Reads little-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf, path: pathlib.Path):
        self.buf, self.path, self.pos = buf, path, 0

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        """Skips `n` bytes; returns where they start."""
        if n > self.left():
            raise ConvertError(f"{self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, "
                               f"{self.left()} left (an incomplete download?)")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size, what))

    def u8(self, what: str) -> int:
        return self.unpack("B", what)[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", what)[0]

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", what)
        start = self.take(n, what)
        raw = bytes(self.buf[start : start + n])
        if n < 2 or raw[-1] != 0 or 0 in raw[:-1]:
            raise ConvertError(f"{self.path}: {what} at offset {start} is not a NUL-terminated string; "
                               "the file is damaged or not a CTranslate2 model.bin")
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ConvertError(f"{self.path}: {what} at offset {start} is not UTF-8; "
                               "the file is damaged") from None
        if not text.isprintable():  # names and spec names: no control characters in a real file
            raise ConvertError(f"{self.path}: {what} at offset {start} holds control characters; "
                               "the file is damaged")
        return text


def _version_of(head: bytes) -> int | None:
    """The binary version a file's first bytes announce, or None if they are no CTranslate2 header."""
    if len(head) < 4:
        return None
    (version,) = struct.unpack_from("<I", head)
    if not 1 <= version < 256:  # zips ("PK..") and pickles (0x80 ..) read as far larger numbers
        return None
    if version >= 2:  # the spec name follows: a short identifier
        if len(head) < 6:
            return None
        (n,) = struct.unpack_from("<H", head, 4)
        name = head[6 : 6 + n]
        if not 2 <= n <= 128 or len(name) < n or name[-1] != 0 or not re.fullmatch(rb"[A-Za-z0-9_]*", name[:-1]):
            return None
    return version


def is_ct2_file(path: str | pathlib.Path) -> bool:
    """Whether `path` is a CTranslate2 model.bin, by its header (HF's PyTorch .bin files are zips or pickles).

    Args:
      path: any file path (a missing file is not one).

    Returns:
      True for a file whose first bytes are a CTranslate2 header, of any binary version.
    """
    try:
        with open(path, "rb") as f:
            return _version_of(f.read(140)) is not None
    except OSError:
        return False


def _entry(c: _Cursor, index: int, seen: set[str]) -> _Entry:
    name = c.string(f"the name of variable {index}")
    if name in seen:
        raise ConvertError(f"{c.path} holds variable {name!r} twice; the file is damaged")
    rank = c.u8(f"the rank of {name}")
    dims = c.unpack(f"{rank}I", f"the shape of {name}")
    type_id = c.u8(f"the dtype of {name}")
    if type_id not in _DTYPES:
        raise ConvertError(f"{c.path}: variable {name} has dtype id {type_id}, which ftjax does not know "
                           f"(known: {', '.join(f'{k} {v[0]}' for k, v in _DTYPES.items())})")
    nbytes = c.u32(f"the size of {name}")
    dtype_name, _, itemsize = _DTYPES[type_id]
    if nbytes != math.prod(dims) * itemsize:
        raise ConvertError(f"{c.path}: variable {name} declares {nbytes} bytes but its shape {list(dims)} of "
                           f"{dtype_name} needs {math.prod(dims) * itemsize}; the file is damaged")
    return _Entry(name, tuple(dims), type_id, c.take(nbytes, f"the data of {name}"), nbytes)


def _aliases(c: _Cursor, names: set[str]) -> dict[str, str]:
    count = c.u32("the alias count")
    if count * 8 > c.left():  # two strings of at least 4 bytes each
        raise ConvertError(f"{c.path} declares {count} aliases but only {c.left()} bytes follow; "
                           "the file is truncated or damaged")
    aliases: dict[str, str] = {}
    for i in range(count):
        alias, target = c.string(f"alias {i}"), c.string(f"the target of alias {i}")
        if alias in names or alias in aliases:
            raise ConvertError(f"{c.path}: alias {alias!r} repeats a variable or alias name; the file is damaged")
        if target not in names and target not in aliases:
            raise ConvertError(f"{c.path}: alias {alias!r} points to {target!r}, which the file does not hold; "
                               "the file is damaged")
        aliases[alias] = target
    return aliases


def _parse(buf, path: pathlib.Path) -> _Header:
    """Walks the whole file, checking every field; allocates no tensor."""
    c = _Cursor(buf, path)
    version = _version_of(bytes(buf[:140]))
    if version is None:
        raise ConvertError(f"{path} is not a CTranslate2 model.bin (its header is not one)")
    c.u32("the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise ConvertError(f"{path} is a CTranslate2 model.bin of binary version {version}; ftjax reads versions "
                           f"{', '.join(map(str, SUPPORTED_VERSIONS))}: convert the model again with a recent "
                           "CTranslate2 (ct2-transformers-converter)")
    spec = c.string("the spec name")
    revision = c.u32("the spec revision")
    count = c.u32("the variable count")
    if count * 10 > c.left():  # name (>= 4 bytes), rank, dtype, nbytes
        raise ConvertError(f"{path} declares {count} variables but only {c.left()} bytes follow; "
                           "the file is truncated or damaged")
    entries: list[_Entry] = []
    seen: set[str] = set()
    for i in range(count):
        entries.append(_entry(c, i, seen))
        seen.add(entries[-1].name)
    aliases = _aliases(c, seen)
    if c.left():
        raise ConvertError(f"{path} has {c.left()} bytes after its last alias; the file is damaged "
                           "(two files joined?)")
    _refuse_quantized(path, entries)
    return _Header(version, spec, revision, entries, aliases)


def _refuse_quantized(path: pathlib.Path, entries: list[_Entry]) -> None:
    for e in entries:
        integer_weight = e.type_id in (1, 2) and e.shape and e.name.endswith("weight")
        if integer_weight or e.name.endswith("weight_scale"):
            kind = _DTYPES[e.type_id][0] if integer_weight else "int8"
            raise ConvertError(f"{path} is a quantized ({kind}) CTranslate2 model ({e.name}); quantized "
                               "CTranslate2 models are not supported: convert with --quantization float16 "
                               "or --quantization float32")


def _array(buf, e: _Entry):
    """One variable as a numpy array that owns its memory (a numpy scalar for rank 0)."""
    _, wire, itemsize = _DTYPES[e.type_id]
    count = e.nbytes // itemsize
    if count == 0:
        out = np.float32 if e.type_id in (0, 4, 5) else np.dtype(wire).newbyteorder("=")
        return np.zeros(e.shape, out)
    raw = np.frombuffer(buf, wire, count, e.offset)
    if e.type_id == 5:  # bfloat16: the high half of a float32
        arr = (raw.astype(np.uint32) << 16).view(np.float32)
    elif e.type_id == 4:
        arr = raw.astype(np.float32)
    else:
        arr = raw.astype(raw.dtype.newbyteorder("="))  # a copy: the map is closed after reading
    del raw
    arr = arr.reshape(e.shape)
    return arr[()] if not e.shape else arr


def _scan(path: str | pathlib.Path, scalars_only: bool = False) -> tuple[_Header, dict[str, Any]]:
    """The checked header of `path` and its variables (only the scalars, if `scalars_only`)."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            if not f.seek(0, 2):
                raise ConvertError(f"{path} is empty; the download is incomplete")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse(buf, path)
                values = {e.name: _array(buf, e) for e in header.entries if not (scalars_only and e.shape)}
    except OSError as e:
        raise ConvertError(f"cannot read {path}: {e.strerror or e}") from None
    return header, values


def read(path: str | pathlib.Path) -> Ct2Model:
    """Reads a CTranslate2 model.bin.

    Args:
      path: the model.bin file.

    Returns:
      Its spec, revision, variables (aliases resolved into them) and aliases.

    Raises:
      ConvertError: an unreadable, damaged, truncated, quantized or unsupported file (one line).
    """
    header, variables = _scan(path)
    for alias, target in header.aliases.items():
        variables[alias] = variables[target]  # targets come first, so chains resolve too
    return Ct2Model(header.spec, header.revision, variables, dict(header.aliases), header.version)


def _whisper_header(path: pathlib.Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Shapes (aliases included) and scalar settings of a Whisper model.bin, checked."""
    if not path.is_file():
        raise ConvertError(f"{path.parent} has no model.bin")
    header, scalars = _scan(path, scalars_only=True)
    if header.spec != "WhisperSpec":
        raise ConvertError(f"{path} holds a {header.spec or 'spec-less model'}, not a Whisper model")
    if header.revision > WHISPER_REVISION:
        raise ConvertError(f"{path} has WhisperSpec revision {header.revision}, newer than the revision "
                           f"{WHISPER_REVISION} layout ftjax reads")
    shapes = {e.name: e.shape for e in header.entries}
    shapes.update({alias: shapes.get(target, ()) for alias, target in header.aliases.items()})
    for name, value in scalars.items():
        if name in _WHISPER_IGNORED:
            continue
        if name not in _WHISPER_FLAGS:
            raise ConvertError(f"{path} sets {name}={value}, a CTranslate2 setting ftjax's Whisper does not have")
        if int(value) != _WHISPER_FLAGS[name]:
            shown = _ACTIVATIONS.get(int(value), value) if name.endswith("activation") else int(value)
            want = _ACTIVATIONS[3] if name.endswith("activation") else _WHISPER_FLAGS[name]
            raise ConvertError(f"{path} sets {name}={shown}; ftjax's Whisper needs {want}")
    return shapes, scalars


def _layers(shapes: dict[str, tuple[int, ...]], stack: str, path: pathlib.Path) -> int:
    found = {int(m.group(1)) for n in shapes if (m := re.match(rf"{stack}/layer_(\d+)/", n))}
    if found != set(range(len(found))) or not found:
        raise ConvertError(f"{path}: the {stack} layers are {sorted(found)}, not 0..n-1")
    return len(found)


def _shape(shapes: dict[str, tuple[int, ...]], name: str, rank: int, path: pathlib.Path) -> tuple[int, ...]:
    if name not in shapes:
        raise ConvertError(f"{path} lacks {name}: not the standard Whisper layout (a low-rank 'lite' "
                           "Whisper, or another model?)")
    if len(shapes[name]) != rank:
        raise ConvertError(f"{path}: {name} has shape {list(shapes[name])}, expected rank {rank}")
    return shapes[name]


def _token_ids(folder: pathlib.Path, vocab_size: int) -> dict[str, int]:
    """Whisper's special token ids from tokenizer.json, else CTranslate2's vocabulary.txt/.json."""
    ids: dict[str, int] = {}
    tok, vocab = folder / "tokenizer.json", folder / "vocabulary.txt"
    if not vocab.is_file() and (folder / "vocabulary.json").is_file():  # ctranslate2 4.x writes JSON
        vocab = folder / "vocabulary.json"
    try:
        if tok.is_file():
            data = json.loads(tok.read_text(encoding="utf-8"))
            ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
            ids = {**data.get("model", {}).get("vocab", {}), **ids}
        elif vocab.suffix == ".json" and vocab.is_file():
            ids = {str(token): i for i, token in enumerate(json.loads(vocab.read_text(encoding="utf-8")))}
        elif vocab.is_file():
            ids = {line: i for i, line in enumerate(vocab.read_text(encoding="utf-8").splitlines())}
        else:
            raise ConvertError(f"{folder} has neither tokenizer.json nor vocabulary.txt; the Whisper special "
                               "token ids come from one of them")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConvertError(f"{tok if tok.is_file() else vocab} is not a valid tokenizer file ({e})") from None
    out = {}
    for key, token in [("eos_token_id", "<|endoftext|>"), ("decoder_start_token_id", "<|startoftranscript|>"),
                       ("no_timestamps_token_id", "<|notimestamps|>")]:
        if key == "no_timestamps_token_id" and token not in ids:
            continue  # optional: used by timestamp-free decoding only
        if not _is_id(ids.get(token)) or not 0 <= ids[token] < vocab_size:
            raise ConvertError(f"the tokenizer in {folder} has no {token} token below the vocabulary size "
                               f"{vocab_size}; is it this model's tokenizer?")
        out[key] = ids[token]
    return {**out, "bos_token_id": out["eos_token_id"], "pad_token_id": out["eos_token_id"]}


def _is_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _generation_facts(folder: pathlib.Path) -> dict[str, Any]:
    """CTranslate2's config.json (suppressed tokens, languages, alignment heads) in HF names."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        ct2 = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(ct2, dict):
        raise ConvertError(f"{path} should hold a JSON object")
    out = {}
    for ct2_key, hf_key in [("suppress_ids", "suppress_tokens"), ("suppress_ids_begin", "begin_suppress_tokens"),
                            ("lang_ids", "lang_ids"), ("alignment_heads", "alignment_heads")]:
        value = ct2.get(ct2_key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(_is_id(v) or (isinstance(v, list) and all(map(_is_id, v)))
                                                  for v in value):
            raise ConvertError(f"{path}: {ct2_key} should be a list of token ids (or of [layer, head] pairs)")
        out[hf_key] = value
    return out


def hf_config(folder: str | pathlib.Path) -> dict[str, Any]:
    """The HF WhisperConfig-style config.json dict of a CTranslate2 Whisper folder.

    Shapes come from model.bin, head counts from its num_heads scalars, token ids from
    tokenizer.json (or vocabulary.txt), suppressed tokens / languages / alignment heads
    from CTranslate2's config.json. The settings model.bin carries are checked.

    Args:
      folder: a folder with a CTranslate2 model.bin (faster-whisper layout).

    Returns:
      A dict with model_type "whisper" and the HF field names.

    Raises:
      ConvertError: a non-Whisper spec, an unsupported setting, a missing weight or token.
    """
    folder = pathlib.Path(folder)
    path = folder / "model.bin"
    shapes, scalars = _whisper_header(path)
    vocab_size, d_model = _shape(shapes, "decoder/embeddings/weight", 2, path)
    heads = {}
    for stack in ("encoder", "decoder"):
        if f"{stack}/num_heads" not in scalars:
            raise ConvertError(f"{path} lacks {stack}/num_heads: not a CTranslate2 Whisper model")
        heads[stack] = int(scalars[f"{stack}/num_heads"])
        if heads[stack] <= 0 or d_model % heads[stack]:
            raise ConvertError(f"{path}: {stack}/num_heads={heads[stack]} does not divide d_model={d_model}")
    config = {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": vocab_size, "d_model": d_model,
        "num_mel_bins": _shape(shapes, "encoder/conv1/weight", 3, path)[1],
        "encoder_layers": _layers(shapes, "encoder", path), "decoder_layers": _layers(shapes, "decoder", path),
        "encoder_attention_heads": heads["encoder"], "decoder_attention_heads": heads["decoder"],
        "encoder_ffn_dim": _shape(shapes, "encoder/layer_0/ffn/linear_0/weight", 2, path)[0],
        "decoder_ffn_dim": _shape(shapes, "decoder/layer_0/ffn/linear_0/weight", 2, path)[0],
        "max_source_positions": _shape(shapes, "encoder/position_encodings/encodings", 2, path)[0],
        "max_target_positions": _shape(shapes, "decoder/position_encodings/encodings", 2, path)[0],
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "is_multilingual": vocab_size >= 51865,
    }
    return {**config, **_token_ids(folder, vocab_size), **_generation_facts(folder)}
