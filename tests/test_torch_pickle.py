"""The torch-free .pth/.bin reader: layouts, dtypes, views, refusals of code in the pickle.

Checkpoints here are written without torch: `_pickle_bytes` emits the pickle opcodes that
torch.save emits (and the malicious ones it never would). Real torch.save files come from
tests/fixtures/make_torch_pickle_fixtures.py.
"""

import io
import os
import pathlib
import pickle
import struct
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from ftjax.convert import torch_pickle
from ftjax.convert.safetensors_io import ConvertError
from tests.conftest import require_asset

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "torch_pickle"
_STORAGE = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
            "bfloat16": "BFloat16Storage", "int8": "CharStorage", "int16": "ShortStorage",
            "int32": "IntStorage", "int64": "LongStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


# ---- a tiny pickle writer: objects below -> protocol-2 opcodes ----
class Global:
    def __init__(self, module, name):
        self.module, self.name = module, name


class Reduce:
    def __init__(self, fn, args, items=None):
        self.fn, self.args, self.items = fn, args, items  # items: SETITEMS after the call


class PersId:
    def __init__(self, pid):
        self.pid = pid


class Raw:
    def __init__(self, data):
        self.data = data


def _emit(obj) -> bytes:
    if obj is None:
        return b"N"
    if obj is True or obj is False:
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        if -(2**31) <= obj < 2**31:
            return b"J" + struct.pack("<i", obj)
        data = obj.to_bytes(16, "little", signed=True)
        return b"\x8a" + bytes([len(data)]) + data
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode()
        return b"X" + struct.pack("<I", len(data)) + data
    if isinstance(obj, tuple):
        return b"(" + b"".join(_emit(x) for x in obj) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(_emit(x) for x in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_emit(k) + _emit(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, Global):
        return b"c" + f"{obj.module}\n{obj.name}\n".encode()
    if isinstance(obj, Reduce):
        out = _emit(obj.fn) + _emit(tuple(obj.args)) + b"R"
        if obj.items:
            out += b"(" + b"".join(_emit(k) + _emit(v) for k, v in obj.items.items()) + b"u"
        return out
    if isinstance(obj, PersId):
        return _emit(obj.pid) + b"Q"
    if isinstance(obj, Raw):
        return obj.data
    raise TypeError(type(obj))


def _pickle_bytes(obj) -> bytes:
    return b"\x80\x02" + _emit(obj) + b"."


def ordered_dict(items):
    return Reduce(Global("collections", "OrderedDict"), (), items)


def tensor(key, dtype, offset, size, stride, numel, storage_module="torch", hooks=None, legacy_view=()):
    """What torch pickles for a tensor; `legacy_view` is (None,) or ((view_key, offset, numel),)."""
    storage = PersId(("storage", Global(storage_module, _STORAGE[dtype]), key, "cpu", numel, *legacy_view))
    args = (storage, offset, tuple(size), tuple(stride), False, hooks if hooks is not None else ordered_dict({}))
    return Reduce(Global("torch._utils", "_rebuild_tensor_v2"), args)


def write_zip(path, obj, storages=None, byteorder="little", root="archive"):
    """A zip checkpoint as torch >= 1.6 writes it; `storages` maps key -> raw bytes."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{root}/data.pkl", _pickle_bytes(obj))
        if byteorder is not None:
            z.writestr(f"{root}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            z.writestr(f"{root}/data/{key}", data)
        z.writestr(f"{root}/version", "3\n")
    return path


def write_legacy(path, obj, storages):
    """The layout of torch < 1.6: five pickles, then each storage as int64 element count + bytes."""
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    out = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, info))
    out += _pickle_bytes(obj) + pickle.dumps(list(storages), protocol=2)
    for arr in storages.values():
        out += struct.pack("<q", arr.size) + arr.tobytes()
    path.write_bytes(out)
    return path


def save_arrays(path, arrays, byteorder="little"):
    """Every array gets its own storage and a contiguous tensor (bfloat16: pass uint16 bits)."""
    items, storages = {}, {}
    for i, (name, (dtype, arr)) in enumerate(arrays.items()):
        arr = np.ascontiguousarray(arr)
        strides = tuple(s // arr.itemsize for s in arr.strides)
        items[name] = tensor(str(i), dtype, 0, arr.shape, strides, arr.size)
        storages[str(i)] = arr.astype(arr.dtype.newbyteorder("<" if byteorder == "little" else ">")).tobytes()
    return write_zip(path, ordered_dict(items), storages, byteorder)


# ---- hand-built checkpoints ----
def _dtype_cases():
    rng = np.random.default_rng(0)
    return {
        "float32": rng.normal(size=(3, 4)).astype(np.float32),
        "float64": rng.normal(size=(5,)),
        "float16": rng.normal(size=(2, 2)).astype(np.float16),
        "int8": np.array([-128, 0, 127], np.int8),
        "int16": np.array([[-32768, 1], [2, 32767]], np.int16),
        "int32": np.array([-(2**31), 2**31 - 1], np.int32),
        "int64": np.array([-(2**62), 2**40, 0], np.int64),
        "uint8": np.array([0, 200, 255], np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.float32(1.5).reshape(()),
        "empty": np.zeros((0, 3), np.float32),
    }


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_dtypes_round_trip(tmp_path, byteorder):
    cases = _dtype_cases()
    spec = {k: ("float32" if k in ("scalar", "empty") else k, v) for k, v in cases.items()}
    loaded = torch_pickle.load_state_dict(save_arrays(tmp_path / "m.pth", spec, byteorder))
    assert list(loaded) == list(cases)
    for k, want in cases.items():
        assert loaded[k].dtype == want.dtype and loaded[k].dtype.isnative, k
        np.testing.assert_array_equal(loaded[k], want, err_msg=k)


def test_bfloat16_widens_to_float32_exactly(tmp_path):
    want = np.array([[1.0, -2.5], [3.140625, 2.0**100], [-0.0, -np.inf]], np.float32)
    bits = (want.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16
    loaded = torch_pickle.load_state_dict(save_arrays(tmp_path / "m.pth", {"w": ("bfloat16", bits)}))
    assert loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], want)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np.testing.assert_array_equal(loaded["w"], bits.view(ml_dtypes.bfloat16).astype(np.float32))


def test_strides_offsets_and_shared_storage(tmp_path):
    base = np.arange(30, dtype=np.float32)
    items = ordered_dict({
        "full": tensor("0", "float32", 0, (5, 6), (6, 1), 30),
        "transposed": tensor("0", "float32", 0, (6, 5), (1, 6), 30),
        "block": tensor("0", "float32", 8, (2, 3), (6, 1), 30),
        "column": tensor("0", "float32", 4, (5,), (6,), 30),
        "broadcast": tensor("0", "float32", 3, (2, 4), (0, 1), 30),
    })
    loaded = torch_pickle.load_state_dict(write_zip(tmp_path / "m.pth", items, {"0": base.tobytes()}))
    m = base.reshape(5, 6)
    for name, want in [("full", m), ("transposed", m.T), ("block", m[1:3, 2:5]), ("column", m[:, 4]),
                       ("broadcast", np.broadcast_to(base[3:7], (2, 4)))]:
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable
    loaded["full"][0, 0] = 99  # copies, not views of one buffer
    assert loaded["transposed"][0, 0] == 0


def test_parameter_torch_size_and_torch_cuda_storage(tmp_path):
    t = tensor("0", "float32", 0, (2,), (1,), 2, storage_module="torch.cuda")
    param = Reduce(Global("torch._utils", "_rebuild_parameter"), (t, True, ordered_dict({})))
    sized = Reduce(Global("torch._utils", "_rebuild_tensor_v2"), (
        PersId(("storage", Global("torch", "FloatStorage"), "0", "cpu", 2)), 0,
        Reduce(Global("torch", "Size"), ([2],)), (1,), False, ordered_dict({}), {}))
    path = write_zip(tmp_path / "m.pth", {"p": param, "s": sized}, {"0": np.float32([1, 2]).tobytes()})
    loaded = torch_pickle.load_state_dict(path)
    np.testing.assert_array_equal(loaded["p"], [1, 2])
    np.testing.assert_array_equal(loaded["s"], [1, 2])


def test_wrappers_and_nested_dicts(tmp_path):
    storages = {"0": np.float32([1, 2, 3]).tobytes()}
    w = tensor("0", "float32", 0, (3,), (1,), 3)
    for wrapper in ("state_dict", "model_state_dict", "model"):
        obj = {"epoch": 3, wrapper: ordered_dict({"a.w": w}), "optimizer": {"lr": 0.1}}
        assert list(torch_pickle.load_state_dict(write_zip(tmp_path / f"{wrapper}.pth", obj, storages))) == ["a.w"]
    nested = {"encoder": {"layer": {"w": w}, "steps": 7}, "head": w, "note": "text"}
    loaded = torch_pickle.load_state_dict(write_zip(tmp_path / "nested.pth", nested, storages))
    assert list(loaded) == ["encoder.layer.w", "head"]


def test_legacy_layout_with_storage_views_and_unused_storages(tmp_path):
    root, other = np.arange(10, dtype=np.float32), np.int64([7, 8, 9])
    obj = {
        "epoch": 2,
        "state_dict": {
            "whole": tensor("0", "float32", 0, (2, 5), (5, 1), 10, legacy_view=(None,)),
            "in_view": tensor("0", "float32", 1, (2,), (2,), 10, legacy_view=(("v", 4, 6),)),
        },
        "optimizer": {"step": tensor("1", "int64", 0, (3,), (1,), 3, legacy_view=(None,))},
    }
    loaded = torch_pickle.load_state_dict(write_legacy(tmp_path / "old.pth", obj, {"0": root, "1": other}))
    assert list(loaded) == ["whole", "in_view"]
    np.testing.assert_array_equal(loaded["whole"], root.reshape(2, 5))
    np.testing.assert_array_equal(loaded["in_view"], [5, 7])


# ---- code in the pickle is refused, and never runs ----
def _system(cmd):
    return Reduce(Global("os", "system"), (cmd,))


def _payloads(marker: pathlib.Path):
    return {
        "os.system": _system(f"touch {marker}"),
        "builtins.exec": Reduce(Global("builtins", "exec"), (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": Reduce(Global("subprocess", "Popen"), (["touch", str(marker)],)),
        "builtins.eval": Reduce(Global("builtins", "eval"), (f"open({str(marker)!r}, 'w')",)),
        "posix.system": Reduce(Global("posix", "system"), (f"touch {marker}",)),
    }


def test_payloads_are_live_under_plain_pickle(tmp_path):
    """Control: the payloads below really do run when a plain pickle.load reads them."""
    marker = tmp_path / "control"
    pickle.loads(_pickle_bytes(_payloads(marker)["builtins.exec"]))
    assert marker.exists()


@pytest.mark.parametrize("name", ["os.system", "builtins.exec", "subprocess.Popen", "builtins.eval", "posix.system"])
def test_malicious_global_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    path = write_zip(tmp_path / "evil.pth", _payloads(marker)[name])
    with pytest.raises(ConvertError, match=rf"evil\.pth refuses pickle global {name}\b"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["value", "backward_hooks", "after_tensors", "wrapper"])
def test_payload_nested_in_a_valid_state_dict(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = _system(f"touch {marker}")
    good = tensor("0", "float32", 0, (2,), (1,), 2)
    items = {"a": good, "b": good}
    if where == "value":
        items["b"] = evil
    elif where == "backward_hooks":
        items["b"] = tensor("0", "float32", 0, (2,), (1,), 2, hooks=evil)
    elif where == "after_tensors":
        items["zz"] = {"deep": [1, (evil,)]}
    obj = {"state_dict": ordered_dict(items), "extra": evil} if where == "wrapper" else ordered_dict(items)
    path = write_zip(tmp_path / "evil.pth", obj, {"0": np.float32([1, 2]).tobytes()})
    with pytest.raises(ConvertError, match=r"refuses pickle global os\.system"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


def test_payload_in_legacy_layout_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    header = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path = tmp_path / "evil_legacy.pth"
    path.write_bytes(header + _pickle_bytes({"w": _system(f"touch {marker}")}))
    with pytest.raises(ConvertError, match=r"evil_legacy\.pth refuses pickle global os\.system"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


def test_payload_via_stack_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    # protocol 4: STACK_GLOBAL takes module and name from the stack ("os", "system").
    body = _emit("os") + _emit("system") + b"\x93" + _emit((f"touch {marker}",)) + b"R"
    path = write_zip(tmp_path / "evil.pth", Raw(body))
    with pytest.raises(ConvertError, match=r"refuses pickle global os\.system"):
        torch_pickle.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("pid, match", [
    (("module", Global("torch", "FloatStorage"), "x.py", "src"), "persistent id 'module'.*nn.Module"),
    (("evil",), "persistent id 'evil'"),
    ("storage", "persistent id 'str'"),
    (("storage", "FloatStorage", "0", "cpu", 2), "malformed storage reference"),
])
def test_unknown_persistent_ids_are_refused(tmp_path, pid, match):
    path = write_zip(tmp_path / "m.pth", {"w": PersId(pid)})
    with pytest.raises(ConvertError, match=match):
        torch_pickle.load_state_dict(path)


def test_allowed_callables_reject_odd_arguments_and_build(tmp_path):
    bad_args = Reduce(Global("torch._utils", "_rebuild_tensor_v2"), ("not a storage", 0, (2,), (1,), False, None))
    with pytest.raises(ConvertError, match="not a readable PyTorch pickle .*not given a storage"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "a.pth", {"w": bad_args}))
    # BUILD (setstate) on an allowed stand-in must not change it for later reads.
    build = Raw(_emit(Global("torch._utils", "_rebuild_tensor_v2")) + _emit((None, {"fn": 1})) + b"b")
    with pytest.raises(ConvertError, match="not a readable PyTorch pickle .*cannot set 'fn'"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "b.pth", {"w": build}))
    # A stand-in is not a class: NEWOBJ cannot instantiate it.
    newobj = Raw(_emit(Global("collections", "OrderedDict")) + _emit(()) + b"\x81")
    with pytest.raises(ConvertError, match="not a readable PyTorch pickle .*NEWOBJ"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "c.pth", newobj))
    test_parameter_torch_size_and_torch_cuda_storage(tmp_path)


# ---- broken and unsupported files ----
def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(ConvertError, match=r"nope\.pth does not exist"):
        torch_pickle.load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "text.bin").write_text("hello")
    with pytest.raises(ConvertError, match=r"text\.bin is not a PyTorch checkpoint"):
        torch_pickle.load_state_dict(tmp_path / "text.bin")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ConvertError, match=r"plain\.pkl is a pickle file but not a PyTorch checkpoint"):
        torch_pickle.load_state_dict(tmp_path / "plain.pkl")


def test_tar_layout_is_not_supported(tmp_path):
    path = tmp_path / "ancient.pth"
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ConvertError, match=r"ancient\.pth uses the tar format of torch < 0.4, which is not "
                                           r"supported.*torch\.save"):
        torch_pickle.load_state_dict(path)


def test_truncated_and_corrupt_zips(tmp_path):
    data = (FIXTURES / "small.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match=r"cut\.pth is a corrupt or truncated zip archive"):
        torch_pickle.load_state_dict(tmp_path / "cut.pth")
    values = np.float32([12345.678, -98765.43, 0.5])
    path = save_arrays(tmp_path / "flip.pth", {"w": ("float32", values)})
    raw = bytearray(path.read_bytes())
    at = raw.index(values.tobytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ConvertError, match=r"flip\.pth is a corrupt or truncated zip archive"):
        torch_pickle.load_state_dict(path)


def test_missing_data_pkl_storage_and_short_storage(tmp_path):
    with zipfile.ZipFile(tmp_path / "nopkl.pth", "w") as z:
        z.writestr("archive/version", "3\n")
    with pytest.raises(ConvertError, match=r"nopkl\.pth is a zip archive without exactly one <root>/data\.pkl"):
        torch_pickle.load_state_dict(tmp_path / "nopkl.pth")
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
        z.writestr("m/code/__torch__.py", "")
        z.writestr("m/constants.pkl", b"")
    with pytest.raises(ConvertError, match=r"script\.pt is a TorchScript archive"):
        torch_pickle.load_state_dict(tmp_path / "script.pt")
    w = {"w": tensor("0", "float32", 0, (4,), (1,), 4)}
    with pytest.raises(ConvertError, match=r"nostorage\.pth: storage archive/data/0 of tensor w is missing"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "nostorage.pth", w, {}))
    with pytest.raises(ConvertError, match=r"short\.pth: storage 0 of tensor w is too short"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "short.pth", w, {"0": b"\0" * 12}))
    past = {"w": tensor("0", "float32", 2, (2, 2), (2, 1), 4)}
    with pytest.raises(ConvertError, match=r"tensor w .* reaches outside its storage"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "past.pth", past, {"0": b"\0" * 16}))
    with pytest.raises(ConvertError, match=r"holds a list, not a state dict"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "list.pth", [1, 2]))
    with pytest.raises(ConvertError, match=r"has no tensors in a state dict"):
        torch_pickle.load_state_dict(write_zip(tmp_path / "empty.pth", {"epoch": 1}))


def test_truncated_legacy_file(tmp_path):
    data = (FIXTURES / "small_legacy.pth").read_bytes()
    for cut, match in [(len(data) - 5, r"cut\.pth: storage \d+ is too short .* truncated"),
                       (len(data) // 2, r"cut\.pth: the pickled object is not a readable .* truncated")]:
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(ConvertError, match=match):
            torch_pickle.load_state_dict(tmp_path / "cut.pth")


# ---- files written by real torch.save ----
@pytest.mark.parametrize("name", ["small.pth", "small_legacy.pth"])
def test_real_torch_files_match_exactly(name):
    want = np.load(FIXTURES / "small_expected.npz")
    got = torch_pickle.load_state_dict(FIXTURES / name)
    assert list(got) == list(want.keys())
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert got["bf16"].dtype == np.float32 and got["f16"].dtype == np.float16
    assert "torch" not in sys.modules


@pytest.mark.parametrize("name", ["wrapped.pth", "wrapped_legacy.pth"])
def test_real_torch_training_checkpoint_wrapper(name):
    got = torch_pickle.load_state_dict(FIXTURES / name)  # the optimizer's tensor is left out
    want = np.load(FIXTURES / "small_expected.npz")
    assert list(got) == ["weight", "bias"]
    np.testing.assert_array_equal(got["weight"], want["linear.weight"])
    np.testing.assert_array_equal(got["bias"], want["linear.bias"])


@pytest.mark.assets
def test_efficientnet_lite0_asset_loads():
    folder = pathlib.Path(require_asset("efficientnet_lite0"))
    got = torch_pickle.load_state_dict(folder / "efficientnet-lite0-57934424.pth")
    total = sum(a.size for a in got.values())
    assert 4.68e6 < total < 4.70e6, total
    assert got["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert got["_conv_stem.weight"].dtype == np.float32
    assert got["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(a).all() for a in got.values() if a.dtype == np.float32)
    assert os.path.getsize(folder / "efficientnet-lite0-57934424.pth") > 4 * 4.6e6
