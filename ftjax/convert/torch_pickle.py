"""Read PyTorch .pth/.bin checkpoints into numpy without torch and without running their code.

`torch.save` writes a pickle whose tensors are rebuilt by calling torch functions. A plain
`pickle.load` would call whatever global the file names (os.system included). Here the
unpickler resolves only an allow-list of globals, and each resolves to a stand-in defined in
this module: `collections.OrderedDict`, `torch._utils._rebuild_tensor{,_v2}`,
`torch._utils._rebuild_parameter{,_with_state}`, `torch.Size`, the `torch.*Storage` types and
the torch dtypes. Any other global, and any persistent id other than a storage, ends the read
with a ConvertError before anything is called.

Two layouts are read:

* zip (the default since torch 1.6): `<root>/data.pkl` (the pickle), `<root>/data/<key>` (raw
  bytes of each storage), `<root>/byteorder` (absent means little-endian).
* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row
  (magic number, protocol 1001, system info, the object, the list of storage keys), then each
  storage as an int64 element count and its raw bytes. Many published weights use it,
  EfficientNet-Lite0's among them.

The very old tar layout (torch < 0.4) and TorchScript archives are refused with a line that
says how to re-save the weights.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pathlib
import pickle
import pickletools
import struct
import tarfile
import zipfile
from typing import Any

import numpy as np

from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import one_line

__all__ = ["load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LEGACY_MAGIC_BYTES = _LEGACY_MAGIC.to_bytes(10, "little")
# Wrapper keys tried, in order, when the top-level dict is a training checkpoint.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_RESAVE = "re-save the weights with torch.save(model.state_dict(), path) in torch >= 1.6"
_MAX_DEPTH = 64  # dicts nested deeper than this (or a dict inside itself) are not a state dict
_MAX_ENTRIES = 1 << 20  # dict entries visited while flattening (a DAG of shared dicts could be 2**n)
# A view may repeat its storage (stride 0, as torch's expand makes), but not beyond this many elements.
_MAX_REPEAT, _MAX_REPEAT_FLOOR = 16, 1 << 20
_MAX_ZIP_RATIO = 32  # torch writes stored (uncompressed) members; a compressed one may not inflate more

# torch storage type -> numpy type code (little-endian); "bf16" is read as uint16 and widened.
_STORAGE_TYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "ByteStorage": "u1", "CharStorage": "i1", "ShortStorage": "i2", "IntStorage": "i4",
    "LongStorage": "i8", "BoolStorage": "b1", "UntypedStorage": "u1",
}
_TORCH_DTYPES = {
    "float32": "f4", "float": "f4", "float64": "f8", "double": "f8", "float16": "f2", "half": "f2",
    "bfloat16": "bf16", "uint8": "u1", "int8": "i1", "int16": "i2", "short": "i2", "int32": "i4",
    "int": "i4", "int64": "i8", "long": "i8", "bool": "b1",
}


class _Frozen:
    """Base of the stand-ins: a pickle BUILD opcode cannot set attributes on them."""

    __slots__ = ()

    def __init__(self, **fields: Any):
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any):
        raise TypeError(f"cannot set {name!r} on a {type(self).__name__}")


class _Callable(_Frozen):
    """An allowed pickle global: calls one function of this module (or OrderedDict)."""

    __slots__ = ("fn", "name")

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _StorageType(_Frozen):
    """Stand-in for `torch.FloatStorage` and friends (and for torch dtypes)."""

    __slots__ = ("code", "name")


class _Storage(_Frozen):
    """A storage a tensor points into: `numel` elements of `code`, `offset` elements into `key`."""

    __slots__ = ("key", "code", "offset", "numel")


class _Tensor(_Frozen):
    """A tensor to build later, once the storage bytes can be read."""

    __slots__ = ("storage", "offset", "size", "stride")


def _ints(x: Any, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(type(i) is int for i in x):
        raise TypeError(f"tensor {what} {x!r} is not a tuple of ints")
    return tuple(x)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _Tensor:
    # _rebuild_tensor_v2 adds requires_grad, backward_hooks and (newer torch) metadata: not needed.
    if not isinstance(storage, _Storage) or type(storage_offset) is not int:
        raise TypeError("_rebuild_tensor was not given a storage and an offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise TypeError(f"tensor size {size} and stride {stride} differ in length")
    return _Tensor(storage=storage, offset=storage_offset, size=size, stride=stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise TypeError("_rebuild_parameter was not given a tensor")
    return data


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _Callable(fn=collections.OrderedDict, name="OrderedDict"),
        ("torch", "Size"): _Callable(fn=_size, name="torch.Size"),
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        allowed["torch._utils", name] = _Callable(fn=_rebuild_tensor, name=name)
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed["torch._utils", name] = _Callable(fn=_rebuild_parameter, name=name)
    for name, code in _STORAGE_TYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[module, name] = _StorageType(code=code, name=f"{module}.{name}")
    for name, code in _TORCH_DTYPES.items():
        allowed["torch", name] = _StorageType(code=code, name=f"torch.{name}")
    return allowed


_ALLOWED = _allowed_globals()


class _Refused(Exception):
    """Raised inside the unpickler; reported as one ConvertError line."""


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals, to stand-ins; accepts only storage persistent ids."""

    def __init__(self, file: Any, path: pathlib.Path, legacy: bool, codes: dict[str, str]):
        super().__init__(file)
        self._path, self._legacy, self._codes = path, legacy, codes

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"{self._path} refuses pickle global {_short(f'{module}.{name}')}: ftjax reads only "
                           "tensors and dicts from PyTorch checkpoints and never runs their code")
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
            hint = "; it holds a whole nn.Module: " + _RESAVE if kind == "module" else ""
            raise _Refused(f"{self._path} refuses pickle persistent id {_short(repr(kind) if isinstance(kind, str) else kind, 40)}{hint}")
        if len(pid) != (6 if self._legacy else 5) or not isinstance(pid[1], _StorageType):
            raise _Refused(f"{self._path} has a malformed storage reference {_short(pid)}")
        key, numel = pid[2], pid[4]
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _Refused(f"{self._path} has a malformed storage reference {_short(pid)}")
        code, offset = pid[1].code, 0
        self._codes.setdefault(key, code)  # legacy layout: sizes the storage bytes that follow
        if self._legacy and pid[5] is not None:  # a view into storage `key` (torch < 0.4 files)
            view = pid[5]
            if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int and type(view[2]) is int):
                raise _Refused(f"{self._path} has a malformed storage view {_short(view)}")
            offset, numel = view[1], view[2]
        return _Storage(key=key, code=code, offset=offset, numel=numel)


def _short(x: Any, n: int = 80) -> str:
    """A one-line, bounded repr of something a pickle made (it may be nested too deep to repr)."""
    try:
        text = (x if x.isprintable() else repr(x)) if isinstance(x, str) else str(x)
    except RecursionError:
        text = f"<a {type(x).__name__} nested too deep>"
    return one_line(text)[:n]


# opcode -> bytes of its little-endian length; each length is checked against the file before reading.
_COUNTED = {b"\x8c": 1, b"U": 1, b"C": 1, b"\x8a": 1, b"X": 4, b"B": 4, b"T": 4, b"\x8b": 4, b"\x8d": 8,
            b"\x8e": 8, b"\x96": 8, b"\x95": 8}
_FIXED = {op.code.encode("latin-1"): op.arg.n for op in pickletools.opcodes if op.arg is not None and op.arg.n > 0}
_LINES = {op.code.encode("latin-1"): 2 if op.arg.name.endswith("_pair") else 1
          for op in pickletools.opcodes if op.arg is not None and op.arg.n == pickletools.UP_TO_NEWLINE}
_KNOWN = {op.code.encode("latin-1") for op in pickletools.opcodes}


def _check_opcodes(f: Any, end: int) -> None:
    """Walks one pickle's opcodes (to STOP) before the unpickler runs them; raises ValueError on a trap.

    CPython's unpickler trusts the file's numbers: a BINBYTES8 length is allocated before it is
    read, a LONG_BINPUT index sizes the memo array (index 2**31: 16 GB), and integers of
    thousands of digits (or colliding hashes) make dicts quadratic. torch.save numbers its memo
    from 0 and writes 64-bit integers, so anything else is refused here.
    """
    ops = 0
    while True:
        code = f.read(1)
        ops += 1
        if not code:
            raise ValueError("the pickle ends before its STOP opcode")
        if code == b".":
            return
        if code not in _KNOWN:
            raise ValueError(f"invalid load key {code!r}")
        if code in _COUNTED:
            width = _COUNTED[code]
            raw = f.read(width)
            if len(raw) < width:
                raise ValueError("the pickle ends inside an opcode")
            n = int.from_bytes(raw, "little")
            if n > end - f.tell():
                raise ValueError(f"an opcode declares {n} bytes, more than the file holds")
            if code == b"\x8b" or (code == b"\x8a" and n > 9 and _LEGACY_MAGIC_BYTES != f.read(n)):
                raise ValueError("an integer wider than 64 bits")  # the legacy magic number is the one exception
            if code != b"\x95" and not (code == b"\x8a" and n > 9):  # FRAME: its bytes are opcodes, read on
                f.seek(n, io.SEEK_CUR)
        elif code in _FIXED:
            raw = f.read(_FIXED[code])
            if len(raw) < _FIXED[code]:
                raise ValueError("the pickle ends inside an opcode")
            if code in (b"q", b"r") and int.from_bytes(raw, "little") > ops:
                raise ValueError(f"memo index {int.from_bytes(raw, 'little')} beyond the {ops} opcodes before it")
        elif code in _LINES:
            for _ in range(_LINES[code]):
                line = f.readline(1 << 16)
                if not line.endswith(b"\n"):
                    raise ValueError("an opcode's text argument has no end of line")
            if code in (b"I", b"L", b"p", b"g") and len(line) > 24:
                raise ValueError("an integer wider than 64 bits")
            if code == b"p" and int(line.rstrip(b"L\n") or 0) > ops:
                raise ValueError("a memo index beyond the opcodes before it")


def _unpickle(file: Any, path: pathlib.Path, legacy: bool, what: str,
              codes: dict[str, str] | None = None) -> Any:
    start, end = file.tell(), file.seek(0, io.SEEK_END)
    file.seek(start)
    try:
        _check_opcodes(file, end)
    except ValueError as e:
        raise ConvertError(f"{path}: {what} is not a readable PyTorch pickle ({_short(str(e), 120)}); the file "
                           "may be truncated or corrupt") from None
    file.seek(start)
    try:
        return _SafeUnpickler(file, path, legacy, {} if codes is None else codes).load()
    except _Refused as e:
        raise ConvertError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises many types
        raise ConvertError(f"{path}: {what} is not a readable PyTorch pickle ({type(e).__name__}: "
                           f"{_short(str(e), 120)}); the file may be truncated or corrupt") from None


def _itemsize(code: str) -> int:
    return 2 if code == "bf16" else np.dtype(code).itemsize


def _np_dtype(code: str, big_endian: bool) -> np.dtype:
    return np.dtype(("u2" if code == "bf16" else code)).newbyteorder(">" if big_endian else "<")


def _build(name: str, t: _Tensor, raw: bytes, big_endian: bool, path: pathlib.Path) -> np.ndarray:
    st = t.storage
    name = _short(name)
    dtype = _np_dtype(st.code, big_endian)
    if (st.offset + st.numel) * dtype.itemsize > len(raw) or st.offset < 0:
        raise ConvertError(f"{path}: storage {_short(st.key)} of tensor {name} is too short ({len(raw)} bytes "
                           f"for {st.offset + st.numel} elements of {dtype.itemsize} bytes); the file is "
                           "truncated or corrupt")
    flat = np.frombuffer(raw, dtype=dtype, count=st.numel, offset=st.offset * dtype.itemsize)
    last = t.offset + sum((d - 1) * s for d, s in zip(t.size, t.stride))
    if min(t.size, default=0) < 0 or (math.prod(t.size) > 0 and (
            t.offset < 0 or min(t.stride, default=0) < 0 or last >= st.numel)):
        raise ConvertError(f"{path}: tensor {name} (offset {t.offset}, size {t.size}, stride "
                           f"{t.stride}) reaches outside its storage of {st.numel} elements")
    if math.prod(t.size) > _MAX_REPEAT * st.numel + _MAX_REPEAT_FLOOR:  # checked before allocating
        raise ConvertError(f"{path}: tensor {name} of size {_short(t.size)} repeats its storage of {st.numel} "
                           "elements more than a real checkpoint does; the file is corrupt or crafted")
    if math.prod(t.size) == 0:
        arr = np.empty(t.size, dtype)
    else:
        strides = tuple(s * dtype.itemsize for s in t.stride)
        arr = np.lib.stride_tricks.as_strided(flat[t.offset:], t.size, strides, writeable=False).copy()
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if st.code == "bf16":  # bfloat16 is the top half of a float32: widening is exact
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _select(obj: Any, path: pathlib.Path) -> dict:
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict; {_RESAVE}")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict) and not any(isinstance(v, _Tensor) for v in obj.values()):
            return obj[key]
    return obj


def _flatten(obj: dict, path: pathlib.Path) -> dict[str, _Tensor]:
    """Nested dicts of tensors -> {"a.b.c": tensor}, in order; refuses cycles, depth and blow-ups."""
    out: dict[str, _Tensor] = {}
    visited = 0
    stack = [(iter(obj.items()), "", 0)]
    while stack:
        items, prefix, depth = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        visited += 1
        if visited > _MAX_ENTRIES:
            raise ConvertError(f"{path}: the state dict has over {_MAX_ENTRIES} entries (dicts shared many "
                               "times over?); the file is corrupt or crafted")
        k, v = entry
        name = f"{prefix}{k if isinstance(k, str) else _short(k, 200)}"
        if isinstance(v, _Tensor):
            out[name] = v
        elif isinstance(v, dict):
            if depth + 1 >= _MAX_DEPTH:
                raise ConvertError(f"{path}: the state dict nests dicts over {_MAX_DEPTH} deep (or inside "
                                   "themselves); the file is corrupt or crafted")
            stack.append((iter(v.items()), f"{name}.", depth + 1))
    return out


def _tensors(obj: Any, path: pathlib.Path) -> dict[str, _Tensor]:
    out = _flatten(_select(obj, path), path)
    if not out:
        keys = list(obj)[:8] if isinstance(obj, dict) else []
        raise ConvertError(f"{path} has no tensors in a state dict (top-level keys: {_short(keys, 200)}); "
                           f"{_RESAVE}")
    return out


def _read_member(z: zipfile.ZipFile, name: str, path: pathlib.Path) -> bytes:
    """One member's bytes, its declared size checked against the archive first (no zip bombs)."""
    info = z.getinfo(name)
    limit = info.compress_size * (1 if info.compress_type == zipfile.ZIP_STORED else _MAX_ZIP_RATIO)
    if info.file_size > min(limit, path.stat().st_size * _MAX_ZIP_RATIO):
        raise ConvertError(f"{path}: member {_short(name)} declares {info.file_size} bytes from "
                           f"{info.compress_size} stored; the archive is corrupt or a zip bomb")
    return z.read(name)


def _load_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as z:
            return _read_zip(z, path)
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - BadZipFile, zlib/lzma/bz2 errors, encrypted or unknown methods
        raise ConvertError(f"{path} is a corrupt or truncated zip archive ({type(e).__name__}: "
                           f"{_short(str(e), 120)}); download or save it again") from None


def _read_zip(z: zipfile.ZipFile, path: pathlib.Path) -> dict[str, np.ndarray]:
    names = z.namelist()
    pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkls) != 1:
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise ConvertError(f"{path} is a TorchScript archive, not a state dict; {_RESAVE}")
        raise ConvertError(f"{path} is a zip archive without exactly one <root>/data.pkl "
                           f"(found {len(pkls)}); it is not a PyTorch checkpoint")
    root = pkls[0][: -len("/data.pkl")]
    big_endian = False
    if f"{root}/byteorder" in names:
        order = _read_member(z, f"{root}/byteorder", path).strip()
        if order not in (b"little", b"big"):
            raise ConvertError(f"{path}: unknown byteorder {order[:20]!r} in {_short(root)}/byteorder")
        big_endian = order == b"big"
    pkl = io.BytesIO(_read_member(z, pkls[0], path))
    tensors = _tensors(_unpickle(pkl, path, legacy=False, what=_short(pkls[0])), path)
    raw: dict[str, bytes] = {}
    out = {}
    for name, t in tensors.items():
        key = t.storage.key
        if key not in raw:
            member = f"{root}/data/{key}"
            if member not in names:
                raise ConvertError(f"{path}: storage {_short(member)} of tensor {_short(name)} is missing; the "
                                   "file is truncated or corrupt")
            raw[key] = _read_member(z, member, path)
        out[name] = _build(name, t, raw[key], big_endian, path)
    return out


def _load_legacy(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if _unpickle(f, path, legacy=True, what="the header") != _LEGACY_MAGIC:
            raise ConvertError(f"{path} is a pickle file but not a PyTorch checkpoint (no torch magic number)")
        if (protocol := _unpickle(f, path, legacy=True, what="the header")) != _LEGACY_PROTOCOL:
            raise ConvertError(f"{path} uses legacy torch protocol {_short(protocol)}; only {_LEGACY_PROTOCOL} "
                               "is read")
        sys_info = _unpickle(f, path, legacy=True, what="the header")
        big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        codes: dict[str, str] = {}  # storage key -> type code, for every storage in the file
        tensors = _tensors(_unpickle(f, path, legacy=True, what="the pickled object", codes=codes), path)
        keys = _unpickle(f, path, legacy=True, what="the storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConvertError(f"{path}: the storage key list is malformed")
        raw: dict[str, bytes] = {}
        for key in keys:  # every storage follows, in list order: int64 element count, then bytes
            header = f.read(8)
            if len(header) != 8:
                raise ConvertError(f"{path}: storage {_short(key)} is missing; the file is truncated")
            if key not in codes:
                raise ConvertError(f"{path}: storage {_short(key)} is listed but never referenced; the file is "
                                   "corrupt")
            (numel,) = struct.unpack("<q", header)
            nbytes = numel * _itemsize(codes[key])
            left = size - f.tell()
            if numel < 0 or nbytes > left:  # checked before reading: the count is the file's word
                raise ConvertError(f"{path}: storage {_short(key)} is too short ({left} bytes left of the {nbytes} "
                                   f"its {numel} elements declare); the file is truncated or corrupt")
            raw[key] = f.read(nbytes)
    out = {}
    for name, t in tensors.items():
        if t.storage.key not in raw:
            raise ConvertError(f"{path}: storage {_short(t.storage.key)} of tensor {_short(name)} is missing")
        out[name] = _build(name, t, raw[t.storage.key], big_endian, path)
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint's tensors into numpy, without torch and without running code.

    The object saved may be a state dict (a dict or OrderedDict of tensors, nn.Parameters
    included) or a training checkpoint that wraps one under "state_dict", "model_state_dict"
    or "model" (tried in that order, and only when the top level holds no tensors itself).
    Nested dicts are flattened with "." joins; entries that are not tensors (epoch numbers,
    strings, lists) are dropped.

    Args:
      path: a `.pth`/`.bin`/`.pt` file from `torch.save`, zip or legacy layout.

    Returns:
      {name: array} in the file's order. Tensors are copied (views and non-contiguous tensors
      come out as their own C-contiguous arrays). dtypes are kept (float16 stays float16),
      except bfloat16, which numpy lacks: it is widened to float32, exactly.

    Raises:
      ConvertError: the file is missing, not a PyTorch checkpoint, truncated or corrupt, in
        the tar layout of torch < 0.4, or names a pickle global outside the allow-list.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConvertError(f"PyTorch checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    if head[:2] == b"\x80\x02":
        return _load_legacy(path)
    if head[:2] == b"PK":
        raise ConvertError(f"{path} is a corrupt or truncated zip archive; download or save it again")
    if tarfile.is_tarfile(path):
        raise ConvertError(f"{path} uses the tar format of torch < 0.4, which is not supported; load it "
                           f"in torch and {_RESAVE}")
    raise ConvertError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a torch pickle)")

