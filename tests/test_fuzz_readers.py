"""Property-based fuzzing of every reader that takes files from strangers (issue 14).

The contract of each reader: every input ends in the reader's result or a UserError
(ConvertError, ...) whose message is one line. Never another exception, never a hang
(> 10 s), never a memory blow-up from a declared size, never a side effect (the
pickle payloads below would create a marker file). Inputs are random bytes, valid
files mutated (truncated, bytes flipped, lengths, counts and shapes made huge, dtypes
changed) and, for the PyTorch pickle reader, payloads that reach os.system, eval,
subprocess and friends through every opcode that imports or calls a global.

CI runs a bounded, derandomized number of examples per reader (the whole module in
well under 2 minutes); benchmarks/fuzz_readers.py runs the same generators for a long
campaign and counts the outcomes per reader.
"""

from __future__ import annotations

import contextlib
import copyreg
import faulthandler
import io
import json
import math
import os
import pathlib
import pickle
import resource
import signal
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ftjax.errors import UserError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TIME_LIMIT_S = 10
MEMORY_LIMIT_MB = 1024  # growth of the peak RSS that one example may cause
# examples per reader in CI; the campaign passes its own count
CI_EXAMPLES = int(os.environ.get("FTJAX_FUZZ_EXAMPLES", "200"))


# ---- the contract, checked on one input --------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm; a BaseException, so no reader's `except Exception` can swallow it."""


class Escape(AssertionError):
    """An input that broke the contract."""


class Campaign:
    """Per-reader counts; `record` is set by the long campaign to keep going after an escape."""

    def __init__(self):
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.escapes: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
        self.record = False
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="ftjax_fuzz_"))
        self.marker = self.work / "MARKER"


CAMPAIGN = Campaign()


def _on_alarm(signum, frame):
    raise Hang()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check(reader: str, fn, blob: bytes = b"") -> str:
    """Runs `fn()` under the contract; returns "result" or "user_error", else raises Escape.

    Args:
      reader: the reader's name (for the counts).
      fn: calls the reader on one input.
      blob: the input's bytes, kept with an escape so it can be replayed.
    """
    c = CAMPAIGN
    c.counts[reader]["tried"] += 1
    peak = _peak_rss_mb()
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(TIME_LIMIT_S)  # a hang in Python code
    faulthandler.dump_traceback_later(6 * TIME_LIMIT_S, exit=True)  # one inside a C library: end the run
    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        outcome = "result"
    except UserError as e:
        outcome = "user_error"
        msg = str(e)
        if "\n" in msg or "\r" in msg or not msg.strip():
            problem = f"UserError message is not one line: {msg[:300]!r}"
    except Hang:
        problem = f"hang: over {TIME_LIMIT_S} s"
    except Exception as e:  # noqa: BLE001 - any other exception is what this test looks for
        import traceback

        tb = "".join(traceback.format_exception(e)[-6:])
        problem = f"{type(e).__name__}: {str(e)[:300]}\n{tb}"
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if c.marker.exists():
        c.marker.unlink()
        problem = "side effect: the payload created the marker file"
    grown = _peak_rss_mb() - peak
    if grown > MEMORY_LIMIT_MB:
        problem = f"memory: the peak RSS grew by {grown:.0f} MB"
    if problem is None:
        c.counts[reader][outcome] += 1
        return outcome
    c.counts[reader]["escapes"] += 1
    if not c.record:
        raise Escape(f"{reader}: {problem}\ninput ({len(blob)} bytes): {blob[:400]!r}")
    if len(c.escapes[reader]) < 20:
        c.escapes[reader].append((problem, blob))
    return "escape"


# ---- byte-level mutations of valid files --------------------------------------------------------

_INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                0xFFFFFFFF, 2**40, 2**62, 2**63 - 1, 2**64 - 1]


@st.composite
def mutated(draw, seeds: list[bytes], fix=None) -> bytes:
    """A seed file with up to 6 mutations; `fix(bytes)` repairs checksums afterwards (or None)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["truncate", "flip", "int", "insert", "delete", "duplicate", "byte"]))
        n = len(data)
        pos = draw(st.integers(0, max(n, 1) * 4)) % (n + 1)
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and n:
            data[pos % n] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[pos % n] = draw(st.integers(0, 255))
        elif op == "int":
            size, order = draw(st.sampled_from([(1, "<"), (2, "<"), (4, "<"), (8, "<"), (2, ">"), (4, ">"),
                                                (8, ">")]))
            value = draw(st.sampled_from(_INTERESTING)) & ((1 << (8 * size)) - 1)
            value = (value + draw(st.sampled_from([0, 0, 1, -1]))) % (1 << (8 * size))
            data[pos:pos + size] = value.to_bytes(size, "little" if order == "<" else "big")
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
    out = bytes(data)
    return fix(out) if fix is not None and draw(st.booleans()) else out


def files_from(seeds: list[bytes], fix=None):
    """Random bytes, mutated seeds and raw seeds."""
    return st.one_of(st.binary(max_size=512), mutated(seeds, fix), mutated(seeds, fix), st.sampled_from(seeds))


def _write(name: str, blob: bytes) -> pathlib.Path:
    path = CAMPAIGN.work / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink))


# ---- CSV / TSV / JSONL (local_text) ------------------------------------------------------------

_CSV_CHARS = st.sampled_from(list(',"\t\n\r \x00\ufeff\\{}[]:') + ["text", "label", "pos", "neg", "1", "0", "é",
                                                                   "null", "1e999", "NaN", "-", "😀"])


@st.composite
def text_file(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from([".csv", ".tsv", ".jsonl"]))
    kind = draw(st.sampled_from(["chars", "rows", "json", "binary"]))
    if kind == "chars":
        blob = "".join(draw(st.lists(_CSV_CHARS, max_size=80))).encode()
    elif kind == "rows":
        sep = "\t" if ext == ".tsv" else ","
        cell = st.one_of(st.sampled_from(["", " ", "pos", "neg", "1", "0", "2.5", "nan", "-inf", '"q"', '"a,b"',
                                          '"x\ny"', "é", "\x00"]), st.text(max_size=6))
        rows = draw(st.lists(st.lists(cell, min_size=1, max_size=4), max_size=6))
        header = draw(st.sampled_from(["text,label", "label,text", "text,text_b,label", "text", "", "\ufefftext,label"]))
        blob = (header.replace(",", sep) + "\n" + "\n".join(sep.join(r) for r in rows)).encode()
    elif kind == "json":
        value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                             lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                       max_size=3), max_leaves=8)
        record = st.fixed_dictionaries({}, optional={"text": value, "label": value, "text_b": value})
        lines = draw(st.lists(st.one_of(record.map(json.dumps), st.sampled_from(
            ["[" * 5000, "{" * 3000, "1" * 5000, '{"text": "a", "label": ' + "9" * 5000 + "}", "", "   ",
             '{"text": "a", "label": 1e999}', '{"text": "a", "label": NaN}'])), max_size=5))
        blob = "\n".join(lines).encode()
    else:
        blob = draw(st.binary(max_size=200))
    if draw(st.booleans()):  # a stranger's encoding
        enc = draw(st.sampled_from(["latin-1", "utf-16", "cp1252", "utf-8-sig"]))
        blob = blob.decode("utf-8", "replace").encode(enc, "replace")
    return ext, blob


def read_text_file(ext: str, blob: bytes, mode: str) -> None:
    from ftjax.data.builders import local_text

    path = str(_write("data" + ext, blob))
    pair = "text_b" if mode == "pair" else None
    if mode == "records":
        list(local_text.read_records(path, [("text", "text_column")]))
        return
    names = ("neg", "pos") if mode == "given" else None
    if mode in ("infer", "pair"):
        names = local_text.infer_label_names(path, "label")
    config = local_text.LocalTextConfig(name="fuzz", text_pair_column=pair, label_names=names or (),
                                        regression=mode == "regression")
    list(local_text.read_examples(path, config))


def _fuzz_text(n):
    @fuzz_settings(n)
    @given(text_file(), st.sampled_from(["records", "given", "infer", "pair", "regression"]))
    def run(file, mode):
        ext, blob = file
        check("csv_tsv_jsonl", lambda: read_text_file(ext, blob, mode), blob)
    return run


# ---- safetensors (safetensors_io) ---------------------------------------------------------------

_ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
              "F8_E4M3", "F8_E5M2", "C64", "F4", "XX", "", "f32"]


def _st_seed() -> bytes:
    from safetensors.numpy import save

    return save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16),
                 "c": np.zeros((0, 2), np.int64)}, metadata={"format": "pt"})


@st.composite
def safetensors_file(draw) -> bytes:
    entries = {}
    offset = 0
    dims = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**32, 2**62, 2**64 - 1, -1]), st.just("x"),
                     st.just(1.5))
    for i in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(dims, max_size=4))
        size = draw(st.integers(0, 64))
        begin = draw(st.sampled_from([offset, 0, offset + 1, 2**63]))
        end = draw(st.sampled_from([begin + size, begin, 2**64 - 1, begin - 1]))
        entries[draw(st.sampled_from(["w", "x", f"t{i}", "__metadata__", "a\nb"]))] = {
            "dtype": draw(st.sampled_from(_ST_DTYPES)), "shape": shape, "data_offsets": [begin, end]}
        offset = max(offset, end if isinstance(end, int) and end < 2**20 else offset)
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"x": 1}, [], "s"]))
    header = json.dumps(entries).encode()
    if draw(st.booleans()):
        header = draw(st.sampled_from([b"[" * 200, b'{"a":' * 200, b"\xff\xfe", b"", b"{}  ", b"null"]))
    length = draw(st.sampled_from([len(header), len(header), 0, 2**63, 2**64 - 1, len(header) + 1, 10**8]))
    return struct.pack("<Q", length) + header + bytes(draw(st.integers(0, 96)))


@st.composite
def safetensors_folder(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["file", "file", "structured", "index"]))
    if kind == "file":
        return "model.safetensors", draw(files_from([_st_seed()]))
    if kind == "structured":
        return "model.safetensors", draw(safetensors_file())
    value = st.recursive(st.none() | st.integers() | st.text(max_size=8) | st.sampled_from(
        ["model.safetensors", "../x", "/etc/passwd", "a\nb", "shard.safetensors", ""]),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
        max_leaves=6)
    index = draw(st.one_of(st.fixed_dictionaries({"weight_map": value}), value.map(lambda v: {"weight_map": {"w": v}})))
    blob = json.dumps(index).encode()
    if draw(st.booleans()):
        blob = draw(st.sampled_from([b"[" * 50000, b"\xff\xfe{", b'{"weight_map": {"w": "' + b"\xff" * 3 + b'"}}']))
    return "model.safetensors.index.json", blob


def read_safetensors(name: str, blob: bytes) -> None:
    from ftjax.convert import safetensors_io

    folder = CAMPAIGN.work / "st"
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    _write(f"st/{name}", blob)
    if name.endswith(".json"):
        _write("st/shard.safetensors", _st_seed())
    safetensors_io.read_safetensors_folder(folder)


def _fuzz_safetensors(n):
    @fuzz_settings(n)
    @given(safetensors_folder())
    def run(file):
        name, blob = file
        check("safetensors", lambda: read_safetensors(name, blob), blob)
    return run


# ---- PyTorch pickles (torch_pickle) -------------------------------------------------------------

def _str_op(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _tuple_op(*ops: bytes) -> bytes:
    return b"(" + b"".join(ops) + b"t"


# A payload: what it calls and with which arguments (each creates the marker file if it runs).
def _payloads(marker: str) -> list[tuple[str, str, bytes]]:
    touch = _str_op(f"touch {marker}")
    code = _str_op(f"open({marker!r}, 'w').close()")
    argv = b"](" + _str_op("touch") + _str_op(marker) + b"e"
    return [("os", "system", _tuple_op(touch)), ("posix", "system", _tuple_op(touch)),
            ("builtins", "eval", _tuple_op(code)), ("builtins", "exec", _tuple_op(code)),
            ("__builtin__", "eval", _tuple_op(code)), ("subprocess", "Popen", _tuple_op(argv)),
            ("subprocess", "call", _tuple_op(argv)), ("subprocess", "check_output", _tuple_op(argv)),
            ("builtins", "open", _tuple_op(_str_op(marker), _str_op("w"))),
            ("io", "open", _tuple_op(_str_op(marker), _str_op("w"))),
            ("os", "mknod", _tuple_op(_str_op(marker))), ("pathlib", "Path", _tuple_op(_str_op(marker))),
            ("torch", "load", _tuple_op(_str_op(marker))), ("collections", "OrderedDict", _tuple_op()),
            ("torch._utils", "_rebuild_tensor_v2", _tuple_op(touch))]


_EXT_CODE = 0x7FFF00F0  # a copyreg extension code registered, during the test, for os.system


def _global_ops(module: str, name: str, route: str) -> bytes:
    """Ops that leave `module.name` on the stack, through GLOBAL, STACK_GLOBAL or EXT4."""
    if route == "GLOBAL":
        return b"c" + f"{module}\n{name}\n".encode()
    if route == "STACK_GLOBAL":
        return _str_op(module) + _str_op(name) + b"\x93"
    return b"\x84" + struct.pack("<i", _EXT_CODE)  # EXT4: os.system, whatever module/name say


def payload_pickle(module: str, name: str, args: bytes, route: str, call: str) -> bytes:
    """A protocol-2 pickle that calls `module.name(*args)` through `call`."""
    g = _global_ops(module, name, route)
    if call == "REDUCE":
        body = g + args + b"R"
    elif call == "NEWOBJ":
        body = g + args + b"\x81"
    elif call == "NEWOBJ_EX":
        body = g + args + b"}\x92"
    elif call == "INST":
        body = b"(" + args[1:-1] + b"i" + f"{module}\n{name}\n".encode()
    elif call == "OBJ":
        body = b"(" + g + args[1:-1] + b"o"
    elif call == "BUILD":  # an allowed OrderedDict whose __setstate__ is set to the global, then BUILD again
        od = b"ccollections\nOrderedDict\n)R"
        body = od + b"}" + _str_op("__setstate__") + g + b"sb" + args + b"b"
    elif call == "BUILD_SLOTS":  # re-point an allowed stand-in's function at the global, then call it
        body = (b"ccollections\nOrderedDict\n" + b"N}" + _str_op("fn") + g + b"s\x86b" + args + b"R")
    elif call == "PERSID":
        body = b"P" + f"{module}.{name}\n".encode()
    else:  # BINPERSID with a storage reference naming a path outside the archive
        body = _tuple_op(_str_op("storage"), b"ctorch\nFloatStorage\n", _str_op(f"../../{name}"), _str_op("cpu"),
                         b"K\x04") + b"Q"
    return b"\x80\x02}" + _str_op("w") + body + b"s."


def deep_pickle(kind: str, depth: int) -> bytes:
    if kind == "lists":
        body = b"]" * depth + b"a" * (depth - 1)
    elif kind == "tuples":
        body = b"(" * depth + b"t" * depth
    elif kind == "dicts":
        body = b"}" + (b"\x8c\x01k}" * depth) + b"s" * depth
    elif kind == "self":  # d = {}; d["k"] = d
        body = b"}q\x00" + _str_op("k") + b"h\x00s"
    elif kind == "self_list":
        body = b"]q\x00h\x00a"
    else:  # a DAG of dicts: d_i = {"a": d_(i-1), "b": d_(i-1)}, 2**depth paths from the root
        depth = min(depth, 2000)
        body = b"}r" + struct.pack("<I", 0) + b"0"
        for i in range(1, depth + 1):
            prev = b"j" + struct.pack("<I", i - 1)
            body += b"}(" + _str_op("a") + prev + _str_op("b") + prev + b"ur" + struct.pack("<I", i) + b"0"
        body += b"j" + struct.pack("<I", depth)
    return b"\x80\x02}" + _str_op("state_dict") + body + b"s."


def torch_zip(pkl: bytes, storages: dict[str, bytes] | None = None, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return buf.getvalue()


def torch_legacy(pkl: bytes, storages: dict[str, tuple[int, bytes]]) -> bytes:
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    out = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, info)) + pkl
    out += pickle.dumps(list(storages), protocol=2)
    for numel, data in storages.values():
        out += struct.pack("<q", numel) + data
    return out


def _tensor_ops(key: str, storage: str, offset, size, stride, numel, legacy: bool) -> bytes:
    def num(v):
        if isinstance(v, int) and -(2**31) <= v < 2**31:
            return b"J" + struct.pack("<i", v)
        if isinstance(v, int):
            raw = v.to_bytes(16, "little", signed=True)
            return b"\x8a" + bytes([len(raw)]) + raw
        return _str_op(str(v))

    pid = _tuple_op(_str_op("storage"), b"ctorch\n" + storage.encode() + b"\n", _str_op(key), _str_op("cpu"),
                    num(numel), *([b"N"] if legacy else []))
    return (b"ctorch._utils\n_rebuild_tensor_v2\n" + _tuple_op(pid + b"Q", num(offset), _tuple_op(*map(num, size)),
                                                              _tuple_op(*map(num, stride)), b"\x89", b"}"))


_BIG = [0, 1, 2, 3, 5, -1, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]


@st.composite
def torch_tensors(draw) -> bytes:
    """A checkpoint whose sizes, strides, offsets, element counts and storage bytes are drawn."""
    legacy = draw(st.booleans())
    items, storages = b"", {}
    for i in range(draw(st.integers(1, 3))):
        storage = draw(st.sampled_from(["FloatStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                                        "BoolStorage", "UntypedStorage", "DoubleStorage"]))
        rank = draw(st.integers(0, 3))
        size = draw(st.lists(st.sampled_from(_BIG), min_size=rank, max_size=rank))
        stride = draw(st.lists(st.sampled_from(_BIG), min_size=draw(st.sampled_from([rank, rank, 1])),
                               max_size=rank + 1))
        numel = draw(st.sampled_from(_BIG + [4, 6, 12]))
        nbytes = draw(st.integers(0, 64))
        key = draw(st.sampled_from([str(i), "0", "../../etc/passwd", "a\nb"]))
        items += _str_op(draw(st.sampled_from([f"t{i}", "w", "x\ny"]))) + _tensor_ops(
            key, storage, draw(st.sampled_from(_BIG)), size, stride, numel, legacy)
        declared = draw(st.sampled_from([numel, nbytes // 8, 2**40, 2**62, -1]))
        storages[key] = (declared if isinstance(declared, int) and -(2**63) <= declared < 2**63 else 0, bytes(nbytes))
    pkl = b"\x80\x02}(" + items + b"u."
    if legacy:
        return torch_legacy(pkl, storages)
    return torch_zip(pkl, {k: v for k, (_, v) in storages.items()})


def _torch_seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted((FIXTURES / "torch_pickle").glob("*.pth"))]
    pkl = b"\x80\x02}(" + _str_op("w") + _tensor_ops("0", "FloatStorage", 0, (2, 3), (3, 1), 6, False) + b"u."
    seeds.append(torch_zip(pkl, {"0": np.arange(6, dtype=np.float32).tobytes()}))
    seeds.append(torch_legacy(b"\x80\x02}(" + _str_op("w") + _tensor_ops("0", "FloatStorage", 0, (2, 3), (3, 1), 6,
                                                                          True) + b"u.",
                              {"0": (6, np.arange(6, dtype=np.float32).tobytes())}))
    return seeds


def _inner_mutation(seeds):
    """Zip seeds whose data.pkl is mutated, the zip itself kept valid (its CRCs recomputed)."""
    pkls = []
    for s in seeds:
        with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(io.BytesIO(s)) as z:
            pkls += [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    return mutated(pkls).map(torch_zip)


@st.composite
def torch_file(draw) -> bytes:
    seeds = _TORCH_SEEDS
    kind = draw(st.sampled_from(["bytes", "inner", "tensors", "payload", "deep", "bomb"]))
    if kind == "bytes":
        return draw(files_from(seeds))
    if kind == "inner":
        return draw(_inner_mutation(seeds))
    if kind == "tensors":
        return draw(torch_tensors())
    if kind == "payload":
        module, name, args = draw(st.sampled_from(_payloads(str(CAMPAIGN.marker))))
        route = draw(st.sampled_from(["GLOBAL", "STACK_GLOBAL", "EXT4"]))
        call = draw(st.sampled_from(["REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "BUILD", "BUILD_SLOTS",
                                     "PERSID", "BINPERSID"]))
        pkl = payload_pickle(module, name, args, route, call)
        where = draw(st.sampled_from(["zip", "legacy", "legacy_header"]))
        if where == "zip":
            return torch_zip(pkl)
        if where == "legacy":
            return torch_legacy(pkl, {})
        return pkl + torch_legacy(b"\x80\x02}.", {})
    if kind == "deep":
        pkl = deep_pickle(draw(st.sampled_from(["lists", "tuples", "dicts", "self", "self_list", "dag"])),
                          draw(st.sampled_from([10, 200, 1100, 5000, 60000])))
        return torch_zip(pkl) if draw(st.booleans()) else torch_legacy(pkl, {})
    # huge declared lengths inside the pickle (BINBYTES8, BINUNICODE8, LONG4) and zip members
    op = draw(st.sampled_from([b"\x8e", b"\x8d", b"\x8b", b"B", b"X"]))
    fmt = "<Q" if op in (b"\x8e", b"\x8d") else "<I"
    pkl = b"\x80\x04" + op + struct.pack(fmt, draw(st.sampled_from([2**31 - 1, 2**32 - 1, 2**34, 2**62])
                                                    ) % (2**32 if fmt == "<I" else 2**64)) + b"abc"
    if draw(st.booleans()):
        return torch_legacy(pkl, {})
    zipped = torch_zip(b"\x80\x02}." + b"\x00" * 200000, compress=zipfile.ZIP_DEFLATED)
    return zipped if draw(st.booleans()) else torch_zip(pkl)


def read_torch(blob: bytes) -> None:
    from ftjax.convert import torch_pickle

    torch_pickle.load_state_dict(_write("model.pth", blob))


def _fuzz_torch(n):
    @fuzz_settings(n)
    @given(torch_file())
    def run(blob):
        check("torch_pickle", lambda: read_torch(blob), blob)
    return run


# ---- images (ImagePreprocess, image_folder.check_image) ---------------------------------------

def _image_seeds() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    seeds = []
    for fmt, im, kw in [("JPEG", rgb, {}), ("JPEG", rgb.convert("L"), {"progressive": True}),
                        ("JPEG", rgb.convert("CMYK"), {}), ("PNG", rgb, {}), ("PNG", rgb.convert("RGBA"), {}),
                        ("PNG", rgb.convert("P"), {"transparency": 0}), ("PNG", rgb.convert("1"), {}),
                        ("PNG", rgb.convert("LA"), {}), ("PNG", rgb.convert("I;16"), {}), ("BMP", rgb, {}),
                        ("BMP", rgb.convert("P"), {}), ("GIF", rgb.convert("P"), {}), ("WEBP", rgb, {}),
                        ("WEBP", rgb, {"lossless": True}), ("TIFF", rgb, {}), ("ICO", rgb, {})]:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        seeds.append(buf.getvalue())
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    seeds.append(buf.getvalue())
    seeds.append(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(" + str(CAMPAIGN.marker).encode()
                 + b") (w) file closefile\nshowpage\n")
    return seeds


def fix_png(blob: bytes) -> bytes:
    """Recomputes every chunk CRC of a PNG, so mutations reach the decoder."""
    if not blob.startswith(b"\x89PNG\r\n\x1a\n"):
        return blob
    out, pos = bytearray(blob[:8]), 8
    while pos + 8 <= len(blob):
        (length,) = struct.unpack_from(">I", blob, pos)
        chunk = blob[pos + 4:pos + 8 + length]
        if len(chunk) < length + 4:
            out += blob[pos:]
            break
        out += blob[pos:pos + 4] + chunk + struct.pack(">I", zlib.crc32(chunk))
        pos += 12 + length
    return bytes(out)


@st.composite
def png_header(draw) -> bytes:
    """A PNG whose IHDR declares drawn (often huge) sizes, depths and colour types, with valid CRCs."""
    w, h = (draw(st.sampled_from([0, 1, 13, 2**15, 2**16 + 1, 2**20, 2**31 - 1, 2**32 - 1])) for _ in range(2))
    ihdr = struct.pack(">IIBBBBB", w, h, draw(st.sampled_from([1, 2, 4, 8, 16, 3])),
                       draw(st.sampled_from([0, 2, 3, 4, 6, 5])), 0, 0, draw(st.sampled_from([0, 1])))
    idat = zlib.compress(bytes(draw(st.sampled_from([0, 10, 5000, 200000]))))
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@st.composite
def image_input(draw):
    kind = draw(st.sampled_from(["bytes", "bytes", "png", "array"]))
    if kind == "bytes":
        return draw(files_from(_IMAGE_SEEDS, fix_png))
    if kind == "png":
        return draw(png_header())
    shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 7]), min_size=0, max_size=4))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.float32, np.int64, np.bool_]))
    return np.zeros(shape, dtype)


_PREPROCESS = [{"image_size": 8, "resize": "resize", "train_augment": "none"},
               {"image_size": 8, "resize": "resize_crop", "train_augment": "random_resized_crop"},
               {"image_size": 8, "resize": "resize", "train_augment": "pad_crop", "mean": (127.0,), "std": (64.0,)}]


def read_image(image, which: int, train: bool) -> None:
    from ftjax.data import images

    if which == 3:
        from ftjax.data.builders import image_folder

        image_folder.check_image(str(_write("img.png", image if isinstance(image, bytes) else b"")))
        return
    p = images.ImagePreprocess(**_PREPROCESS[which])
    if train:
        p.train_image(image, np.random.default_rng(0))
    else:
        p.eval_image(image)


def _fuzz_images(n):
    @fuzz_settings(n)
    @given(image_input(), st.integers(0, 3), st.booleans())
    def run(image, which, train):
        blob = image if isinstance(image, bytes) else repr(image).encode()
        check("images", lambda: read_image(image, which, train), blob)
    return run


# ---- CTranslate2 model.bin --------------------------------------------------------------------

def _ct2_str(text, n=None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", (len(raw) + 1 if n is None else n) % 65536) + raw + b"\0"


def _ct2_var(name, value) -> bytes:
    arr = np.asarray(value)
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
           np.dtype(np.float16): 4}
    data = arr.tobytes()
    return (_ct2_str(name) + struct.pack(f"<B{arr.ndim}I", arr.ndim, *arr.shape)
            + struct.pack("<BI", ids[arr.dtype], len(data)) + data)


def _ct2_seed() -> bytes:
    variables = [_ct2_var("a/w", np.arange(6, dtype=np.float32).reshape(2, 3)), _ct2_var("a/n", np.int16(4)),
                 _ct2_var("b/h", np.array([1.5, -2.0], np.float16)), _ct2_var("e", np.zeros((0, 2), np.int8))]
    return (struct.pack("<I", 6) + _ct2_str("WhisperSpec") + struct.pack("<II", 3, len(variables))
            + b"".join(variables) + struct.pack("<I", 1) + _ct2_str("c/w") + _ct2_str("a/w"))


@st.composite
def ct2_file(draw) -> bytes:
    if draw(st.booleans()):
        return draw(files_from([_ct2_seed()]))
    out = struct.pack("<I", draw(st.sampled_from([6, 5, 6, 4, 7, 0, 2**31]))) + _ct2_str(
        draw(st.sampled_from(["WhisperSpec", "TransformerSpec", "x\ny", ""])))
    count = draw(st.integers(0, 3))
    out += struct.pack("<II", 3, draw(st.sampled_from([count, count, 2**32 - 1, 2**28])))
    for i in range(count):
        rank = draw(st.sampled_from([0, 1, 2, 4, 255]))
        dims = [draw(st.sampled_from([0, 1, 2, 3, 2**16, 2**32 - 1])) for _ in range(min(rank, 4))]
        type_id = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 255]))
        size = {0: 4, 1: 1, 2: 2, 3: 4, 4: 2, 5: 2}.get(type_id, 1) * math.prod(dims)
        nbytes = draw(st.sampled_from([size % 2**32, 0, 2**32 - 1, 8]))
        out += (_ct2_str(draw(st.sampled_from([f"v{i}", "v0", "x/weight", "x/weight_scale", "n\n"])),
                         draw(st.sampled_from([None, None, 0, 1, 65535])))
                + struct.pack("<B", rank) + struct.pack(f"<{len(dims)}I", *dims)
                + struct.pack("<BI", type_id, nbytes) + bytes(min(nbytes, draw(st.integers(0, 64)))))
    aliases = draw(st.sampled_from([0, 1, 2**32 - 1]))
    out += struct.pack("<I", aliases) + b"".join(_ct2_str(draw(st.sampled_from(["c", "v0", "zz"])))
                                                 + _ct2_str(draw(st.sampled_from(["v0", "c", "nope"])))
                                                 for _ in range(min(aliases, 2)))
    return out


def read_ct2(blob: bytes) -> None:
    from ftjax.convert import ctranslate2

    ctranslate2.read(_write("model.bin", blob))


def _fuzz_ct2(n):
    @fuzz_settings(n)
    @given(ct2_file())
    def run(blob):
        check("ctranslate2", lambda: read_ct2(blob), blob)
    return run


# ---- ONNX ---------------------------------------------------------------------------------------

def _onnx_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((FIXTURES / "onnx").glob("*.onnx"))] + [_onnx_tiny()]


def _onnx_tiny(mutate=None) -> bytes:
    """A one-layer BERT encoder graph laid out as torch.onnx.export lays it out (hidden 2)."""
    from onnx import TensorProto, helper, numpy_helper

    h, i, v, p = 2, 3, 4, 3
    inits, nodes = {}, []
    inits["bert.embeddings.word_embeddings.weight"] = np.ones((v, h), np.float32)
    inits["bert.embeddings.position_embeddings.weight"] = np.ones((p, h), np.float32)
    inits["bert.embeddings.token_type_embeddings.weight"] = np.ones((2, h), np.float32)
    for n in ("embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm"):
        inits[f"bert.{n}.weight"] = inits[f"bert.{n}.bias"] = np.ones(h, np.float32)
    nodes.append(helper.make_node("Gather", ["bert.embeddings.word_embeddings.weight", "ids"], ["x"],
                                  name="/bert/embeddings/word_embeddings/Gather"))
    dense = {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
             "attention.output.dense": (h, h), "intermediate.dense": (i, h), "output.dense": (h, i)}
    for k, (module, (out, inp)) in enumerate(dense.items()):
        scope = f"/bert/encoder/layer.0/{module.replace('.', '/')}"
        inits[f"onnx::MatMul_{k}"] = np.ones((inp, out), np.float32)
        inits[f"bert.encoder.layer.0.{module}.bias"] = np.ones(out, np.float32)
        nodes.append(helper.make_node("MatMul", ["x", f"onnx::MatMul_{k}"], [f"{scope}/mm"], name=f"{scope}/MatMul"))
        nodes.append(helper.make_node("Add", [f"bert.encoder.layer.0.{module}.bias", f"{scope}/mm"], [f"{scope}/o"],
                                      name=f"{scope}/Add"))
    tensors = [numpy_helper.from_array(a, n) for n, a in inits.items()]
    if mutate is not None:
        mutate(tensors, nodes)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"])],
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", h])], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@st.composite
def onnx_structured(draw) -> bytes:
    """The tiny graph with one tensor's dims, type or data, or one node's attributes, made wrong."""
    from onnx import TensorProto, helper

    what = draw(st.sampled_from(["dims", "type", "raw", "float_data", "external", "attr", "name", "segment"]))
    index = draw(st.integers(0, 30))
    value = draw(st.sampled_from([0, 1, -1, 2**31, 2**40, 2**62, 2**63 - 1]))

    def mutate(tensors, nodes):
        t = tensors[index % len(tensors)]
        node = nodes[index % len(nodes)]
        if what == "dims":
            t.dims[:] = draw(st.lists(st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**62]), max_size=4))
        elif what == "type":
            t.data_type = draw(st.sampled_from([0, 2, 3, 6, 7, 9, 10, 11, 13, 16, 17, 23, 40, 255]))
        elif what == "raw":
            t.raw_data = bytes(draw(st.integers(0, 64)))
        elif what == "float_data":
            t.ClearField("raw_data")
            t.float_data[:] = [1.0] * draw(st.integers(0, 8))
        elif what == "external":
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=draw(st.sampled_from(["../../etc/passwd", "x\ny", "w.bin"])))
            t.external_data.add(key="length", value=str(value))
        elif what == "segment":
            t.segment.begin, t.segment.end = 0, value
        elif what == "attr":
            name = draw(st.sampled_from(["transB", "transA", "alpha", "beta", "perm", "epsilon"]))
            attr = draw(st.sampled_from([1, 0.5, "s", [1, 0], [2, 3, 1], b"b", np.ones((2, 2), np.float32)]))
            node.op_type = draw(st.sampled_from([node.op_type, "Gemm", "Transpose", "If", "LayerNormalization"]))
            if isinstance(attr, np.ndarray):
                from onnx import numpy_helper

                attr = numpy_helper.from_array(attr)
            node.attribute.append(helper.make_attribute(name, attr))
        elif what == "name":
            node.name = draw(st.sampled_from(["", "/", "a\nb", "/bert/encoder/layer.0/attention/self/query/x/MatMul",
                                              "/" * 300]))
            t.name = draw(st.sampled_from([t.name, "x", "a\nb", "bert.embeddings.word_embeddings.weight",
                                           "y.bert.embeddings.word_embeddings.weight"]))

    return _onnx_tiny(mutate)


@st.composite
def onnx_file(draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["bytes", "structured", "structured"]))
    blob = draw(files_from(_ONNX_SEEDS)) if kind == "bytes" else draw(onnx_structured())
    return blob, draw(st.sampled_from(["read", "read", "facts"]))


def read_onnx(blob: bytes, how: str) -> None:
    from ftjax.convert import onnx_io

    path = _write("model.onnx", blob)
    if how == "read":
        onnx_io.read_onnx(path, "bert")
    else:
        onnx_io.bert_config_facts(path)


def _fuzz_onnx(n):
    @fuzz_settings(n)
    @given(onnx_file())
    def run(file):
        blob, how = file
        check("onnx", lambda: read_onnx(blob, how), blob)
    return run


# ---- audio (read_audio) --------------------------------------------------------------------------

def _audio_seeds() -> list[bytes]:
    import soundfile as sf

    t = np.linspace(0, 1, 400, dtype=np.float32)
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    seeds = []
    for fmt, sub, data, rate in [("WAV", "PCM_16", x, 8000), ("WAV", "FLOAT", np.stack([x, -x], 1), 8000),
                                 ("FLAC", "PCM_16", x, 8000), ("OGG", "VORBIS", x, 8000), ("AIFF", "PCM_24", x, 8000),
                                 ("AU", "ULAW", x, 8000), ("MP3", "MPEG_LAYER_III", x, 8000), ("WAV", "PCM_U8", x, 1),
                                 ("CAF", "ALAC_16", x, 8000), ("W64", "DOUBLE", x, 8000)]:
        buf = io.BytesIO()
        with contextlib.suppress(Exception):  # a libsndfile built without a codec writes nothing
            sf.write(buf, data, rate, format=fmt, subtype=sub)
            seeds.append(buf.getvalue())
    return seeds


@st.composite
def wav_header(draw) -> bytes:
    """A WAV whose fmt and data chunks declare drawn (often huge or zero) rates, channels and sizes."""
    channels = draw(st.sampled_from([0, 1, 2, 1024, 65535]))
    rate = draw(st.sampled_from([0, 1, 8000, 16000, 2**31 - 1, 2**32 - 1]))
    bits = draw(st.sampled_from([0, 8, 16, 24, 32, 64, 7]))
    fmt_tag = draw(st.sampled_from([1, 3, 6, 7, 0xFFFE, 2, 0x55, 0]))
    data = bytes(draw(st.sampled_from([0, 2, 64, 1000])))
    declared = draw(st.sampled_from([len(data), 2**31, 2**32 - 1, 0]))
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, (rate * channels * bits // 8) % 2**32,
                      (channels * bits // 8) % 65536, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", declared) + data
    return b"RIFF" + struct.pack("<I", draw(st.sampled_from([len(body), 2**32 - 1]))) + body


def read_audio_input(blob: bytes, limit, by_path: bool) -> None:
    from ftjax.data import audio

    audio.read_audio(str(_write("clip.wav", blob)) if by_path else blob, max_seconds=limit)


def _fuzz_audio(n):
    @fuzz_settings(n)
    @given(st.one_of(files_from(_AUDIO_SEEDS), wav_header()), st.sampled_from([30.0, 0.01, None]), st.booleans())
    def run(blob, limit, by_path):
        check("audio", lambda: read_audio_input(blob, limit, by_path), blob)
    return run


# ---- speech manifests (speech_manifest) ----------------------------------------------------------

@st.composite
def manifest(draw) -> tuple[str, bytes]:
    ext = draw(st.sampled_from([".csv", ".tsv", ".jsonl"]))
    audio = st.sampled_from(["good.wav", "bad.wav", "empty.wav", "long.wav", "missing.wav", "", " ", "sub",
                             "/etc/passwd", "../../etc/hostname", "good.wav\n", "a,b", '"'])
    text = st.one_of(st.sampled_from(["hello", "", " ", "a\nb", "é"]), st.text(max_size=5))
    rows = draw(st.lists(st.tuples(audio, text), max_size=4))
    if ext == ".jsonl":
        blob = "\n".join(json.dumps({"audio_path": a, "text": t, "speaker": draw(st.sampled_from([None, 1, [], "s"]))})
                         for a, t in rows).encode()
    else:
        sep = "\t" if ext == ".tsv" else ","
        blob = (f"audio_path{sep}text\n" + "\n".join(f"{a}{sep}{t}" for a, t in rows)).encode()
    if draw(st.booleans()):
        blob = draw(mutated([blob or b"audio_path,text\n"]))
    return ext, blob


def _speech_folder() -> pathlib.Path:
    import soundfile as sf

    folder = CAMPAIGN.work / "speech"
    if not (folder / "good.wav").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sub").mkdir(exist_ok=True)
        sf.write(folder / "good.wav", np.zeros(800, np.float32), 8000)
        sf.write(folder / "long.wav", np.zeros(8000 * 3, np.float32), 8000)
        sf.write(folder / "empty.wav", np.zeros(0, np.float32), 8000)
        (folder / "bad.wav").write_bytes(b"RIFF\xff\xff\xff\xffWAVEjunk")
    return folder


def read_speech(ext: str, blob: bytes) -> None:
    from ftjax.data.builders import speech_manifest

    path = _speech_folder() / f"manifest{ext}"
    path.write_bytes(blob)
    c = speech_manifest.SpeechManifestConfig(name="fuzz", max_seconds=2.0)
    speech_manifest._stamp(str(path), c)
    list(speech_manifest.read_manifest(str(path), c))


def _fuzz_speech(n):
    @fuzz_settings(n)
    @given(manifest())
    def run(file):
        ext, blob = file
        check("speech_manifest", lambda: read_speech(ext, blob), blob)
    return run


# ---- the readers, for CI and for the campaign ----------------------------------------------------

_TORCH_SEEDS = _torch_seeds()
_IMAGE_SEEDS = _image_seeds()
_AUDIO_SEEDS = _audio_seeds()
_ONNX_SEEDS = _onnx_seeds()

FUZZERS = {"csv_tsv_jsonl": _fuzz_text, "safetensors": _fuzz_safetensors, "torch_pickle": _fuzz_torch,
           "images": _fuzz_images, "ctranslate2": _fuzz_ct2, "onnx": _fuzz_onnx, "audio": _fuzz_audio,
           "speech_manifest": _fuzz_speech}


@contextlib.contextmanager
def os_system_extension():
    """Registers a copyreg extension code for os.system, as a poisoned environment might."""
    copyreg.add_extension("os", "system", _EXT_CODE)
    try:
        yield
    finally:
        copyreg.remove_extension("os", "system", _EXT_CODE)


@pytest.mark.parametrize("reader", sorted(FUZZERS))
def test_fuzz_reader(reader):
    with os_system_extension():
        FUZZERS[reader](CI_EXAMPLES)()


def test_every_pickle_payload_route_is_refused_without_side_effects():
    """Every (global, import opcode, call opcode, layout) combination, exhaustively."""
    marker = str(CAMPAIGN.marker)
    with os_system_extension():
        for module, name, args in _payloads(marker):
            for route in ("GLOBAL", "STACK_GLOBAL", "EXT4"):
                for call in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "INST", "OBJ", "BUILD", "BUILD_SLOTS", "PERSID",
                             "BINPERSID"):
                    pkl = payload_pickle(module, name, args, route, call)
                    for blob in (torch_zip(pkl), torch_legacy(pkl, {}), pkl + torch_legacy(b"\x80\x02}.", {})):
                        outcome = check("torch_pickle", lambda b=blob: read_torch(b), blob)
                        assert outcome == "user_error", (module, name, route, call)


@pytest.mark.parametrize("kind", ["lists", "tuples", "dicts", "self", "self_list", "dag"])
def test_deep_and_recursive_pickles_are_one_line_errors(kind):
    for depth in (50, 1100, 100000):
        pkl = deep_pickle(kind, depth)
        for blob in (torch_zip(pkl), torch_legacy(pkl, {})):
            assert check("torch_pickle", lambda b=blob: read_torch(b), blob) == "user_error"


def test_every_truncation_of_every_small_seed():
    """Each seed cut at every byte: every region of the format (header, names, shapes, data, tail)."""
    cases = [("torch_pickle", s, read_torch) for s in _TORCH_SEEDS] + [
        ("ctranslate2", _ct2_seed(), read_ct2), ("safetensors", _st_seed(), lambda b: read_safetensors(
            "model.safetensors", b))] + [("audio", s, lambda b: read_audio_input(b, 30.0, False))
                                         for s in _AUDIO_SEEDS[:3]] + [
        ("images", s, lambda b: read_image(b, 3, False)) for s in _IMAGE_SEEDS[:14]]
    for reader, blob, fn in cases:
        step = max(1, len(blob) // 300)
        for cut in range(0, len(blob), step):
            check(reader, lambda f=fn, b=blob[:cut]: f(b), blob[:cut])


# ---- the text reader's new-user mistakes --------------------------------------------------------

def _csv(tmp_path, text: str | bytes, name="reviews.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


@pytest.mark.parametrize("label", ["", "   "])
def test_empty_label_cell_is_not_a_class(tmp_path, label):
    from ftjax.data.builders import local_text

    path = _csv(tmp_path, f"text,label\ngreat film,pos\ndull film,neg\nno label here,{label}\n")
    with pytest.raises(UserError) as e:
        local_text.infer_label_names(path, "label")
    assert str(e.value).startswith(f"{path}:4: empty label") and "\n" not in str(e.value)
    config = local_text.LocalTextConfig(name="t", label_names=("neg", "pos"))
    with pytest.raises(UserError, match=r"reviews\.csv:4: empty label"):
        list(local_text.read_examples(path, config))
    jsonl = _csv(tmp_path, '{"text": "a", "label": "pos"}\n{"text": "b", "label": null}\n', "r.jsonl")
    with pytest.raises(UserError, match=r"r\.jsonl:2: empty label"):
        local_text.infer_label_names(jsonl, "label")
    regression = local_text.LocalTextConfig(name="t", regression=True)
    with pytest.raises(UserError, match=r"reviews\.csv:2: empty label|reviews\.csv:2: regression"):
        list(local_text.read_examples(_csv(tmp_path, "text,label\na,\n"), regression))


def test_non_utf8_csv_names_the_file_line_and_byte(tmp_path):
    from ftjax.data.builders import local_text

    path = _csv(tmp_path, "text,label\ngood film,pos\ncaf\xe9 scene,neg\n".encode("latin-1"))
    for read in (lambda: local_text.infer_label_names(path, "label"),
                 lambda: list(local_text.read_records(path, [("text", "text_column")]))):
        with pytest.raises(UserError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}:3:"), msg
        assert "byte 28" in msg and "UTF-8" in msg and "re-save" in msg, msg
    utf16 = _csv(tmp_path, "text,label\ngood,pos\n".encode("utf-16"), "excel.csv")
    with pytest.raises(UserError, match=r"excel\.csv:1: .*UTF-16.*re-save"):
        local_text.infer_label_names(utf16, "label")


def test_utf8_with_bom_reads_its_first_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; the first header is still "text"."""
    from ftjax.data.builders import local_text

    path = _csv(tmp_path, "\ufefftext,label\ngood film,pos\n")
    assert [r for _, r in local_text.read_records(path, [("text", "text_column")])] == [
        {"text": "good film", "label": "pos"}]
