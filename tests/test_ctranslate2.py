"""The CTranslate2 model.bin reader: round trips, every bad input as one line, Whisper config, dispatch."""

import json
import pathlib
import re
import struct

import numpy as np
import pytest

from ftjax import convert, models
from ftjax.convert import ctranslate2
from ftjax.errors import UserError
from tests.conftest import require_asset

_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
        np.dtype(np.float16): 4}


# A writer of the format, from the layout in ftjax/convert/ctranslate2.py's docstring.
def _s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def _var(name, value, type_id=None, nbytes=None, dims=None) -> bytes:
    arr = np.asarray(value)
    if type_id is None:
        type_id = _IDS[arr.dtype]
    data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    dims = arr.shape if dims is None else dims
    return (_s(name) + struct.pack(f"<B{len(dims)}I", len(dims), *dims)
            + struct.pack("<BI", type_id, len(data) if nbytes is None else nbytes) + data)


def _bf16(name, value) -> bytes:
    return _var(name, (np.asarray(value, np.float32).view(np.uint32) >> 16).astype(np.uint16), type_id=5)


def _model(variables, aliases=(), version=6, spec="WhisperSpec", revision=3) -> bytes:
    return (struct.pack("<I", version) + _s(spec) + struct.pack("<II", revision, len(variables))
            + b"".join(variables) + struct.pack("<I", len(aliases)) + b"".join(_s(a) + _s(t) for a, t in aliases))


def _write(path: pathlib.Path, blob: bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def _small() -> bytes:
    return _model([_var("a/w", np.arange(6, dtype=np.float32).reshape(2, 3)), _var("a/n", np.int16(4)),
                   _var("b/h", np.array([1.5, -2.0], np.float16))], [("c/w", "a/w")])


def _whisper_vars(**flags) -> list[bytes]:
    """A tiny Whisper in CTranslate2 names: d_model 8, 2 heads, 1+2 layers, vocab 16, 4 mels."""
    f32 = lambda *shape: np.ones(shape, np.float32)  # noqa: E731
    out = [_var("encoder/conv1/weight", f32(8, 4, 3)), _var("encoder/conv2/weight", f32(8, 8, 3)),
           _var("encoder/position_encodings/encodings", f32(6, 8)), _var("encoder/num_heads", np.int16(2)),
           _var("decoder/embeddings/weight", f32(16, 8)), _var("decoder/position_encodings/encodings", f32(5, 8)),
           _var("decoder/num_heads", np.int16(2)), _var("encoder/layer_0/ffn/linear_0/weight", f32(24, 8))]
    out += [_var(f"decoder/layer_{i}/ffn/linear_0/weight", f32(20, 8)) for i in range(2)]
    settings = {"decoder/pre_norm": 1, "decoder/activation": 3, "decoder/scale_embeddings": 0, **flags}
    return out + [_var(k, np.int8(v)) for k, v in settings.items()]


def _whisper_folder(root: pathlib.Path, blob: bytes | None = None, tokenizer=True) -> pathlib.Path:
    _write(root / "model.bin", blob or _model(_whisper_vars(), [("decoder/projection/weight",
                                                                 "decoder/embeddings/weight")]))
    (root / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [3, 10],
                                                  "lang_ids": [12], "alignment_heads": [[1, 0]]}))
    if tokenizer:
        (root / "tokenizer.json").write_text(json.dumps({"added_tokens": [
            {"id": 10, "content": "<|endoftext|>"}, {"id": 11, "content": "<|startoftranscript|>"}]}))
    return root


def _one_line_error(path, fn=ctranslate2.read) -> str:
    with pytest.raises(UserError) as e:
        fn(path)
    assert isinstance(e.value, convert.ConvertError)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_round_trip_of_every_dtype_scalars_and_aliases(tmp_path):
    x = np.array([[0.5, -1.25, 3.0], [1e-3, 2.0, -0.0]], np.float32)
    blob = _model([_var("f32", x), _var("i8", np.array([-128, 0, 127], np.int8)), _var("i16", np.int16(-7)),
                   _var("i32", np.arange(24, dtype=np.int32).reshape(2, 3, 4)), _var("f16", x.astype(np.float16)),
                   _bf16("bf16", [1.0, -2.5, 196608.0, 0.15625]), _var("empty", np.zeros((0, 3), np.float32))],
                  [("alias", "f32"), ("alias2", "alias")], spec="TransformerSpec", revision=7)
    m = ctranslate2.read(_write(tmp_path / "model.bin", blob))
    assert (m.spec, m.revision, m.binary_version, m.aliases) == ("TransformerSpec", 7, 6,
                                                                 {"alias": "f32", "alias2": "alias"})
    v = m.variables
    assert sorted(v) == ["alias", "alias2", "bf16", "empty", "f16", "f32", "i16", "i32", "i8"]
    np.testing.assert_array_equal(v["f32"], x)
    assert v["alias"] is v["f32"] and v["alias2"] is v["f32"]
    assert v["i8"].dtype == np.int8 and v["i8"].tolist() == [-128, 0, 127]
    assert isinstance(v["i16"], np.int16) and v["i16"] == -7  # a numpy scalar
    assert v["i32"].shape == (2, 3, 4) and v["i32"][1, 2, 3] == 23
    assert v["f16"].dtype == np.float32 and np.allclose(v["f16"], x, atol=1e-3)
    assert v["bf16"].dtype == np.float32 and v["bf16"].tolist() == [1.0, -2.5, 196608.0, 0.15625]
    assert v["empty"].shape == (0, 3)
    v["f32"][0, 0] = 9.0  # arrays own their memory: writable, the file closed
    assert ctranslate2.is_ct2_file(tmp_path / "model.bin")


def test_is_ct2_file_tells_ct2_from_pytorch(tmp_path):
    assert ctranslate2.is_ct2_file(_write(tmp_path / "a.bin", _small()))
    assert ctranslate2.is_ct2_file(_write(tmp_path / "v7.bin", _model([], version=7)))  # read() says why
    assert not ctranslate2.is_ct2_file(_write(tmp_path / "zip.bin", b"PK\x03\x04" + b"\0" * 60))
    assert not ctranslate2.is_ct2_file(_write(tmp_path / "pickle.bin", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8"))
    assert not ctranslate2.is_ct2_file(_write(tmp_path / "short.bin", b"\x06\0"))
    assert not ctranslate2.is_ct2_file(tmp_path / "missing.bin")


_F = np.ones((2, 2), np.float32)
_BAD = {
    "not_ct2": (b"PK\x03\x04" + b"\0" * 40, r"is not a CTranslate2 model.bin"),
    "empty": (b"", r"is empty"),
    "version_7": (_model([], version=7), r"binary version 7; ftjax reads versions 5, 6"),
    "version_3": (_model([], version=3), r"binary version 3"),
    "truncated": (_small()[:60], r"is truncated: the data of a/w needs 24 bytes at offset 46, 14 left"),
    "unknown_dtype": (_model([_var("x", _F, type_id=9)]), r"variable x has dtype id 9"),
    "nbytes": (_model([_var("x", _F, nbytes=12)]), r"x declares 12 bytes but its shape \[2, 2\] of float32 needs 16"),
    "huge_tensor": (_model([_var("x", np.zeros(0, np.float32), dims=(1 << 28,), nbytes=1 << 30)]),
                    r"truncated: the data of x needs 1073741824 bytes"),
    "huge_count": (struct.pack("<I", 6) + _s("WhisperSpec") + struct.pack("<II", 3, 0xFFFFFFFF),
                   r"declares 4294967295 variables but only 0 bytes follow"),
    "huge_aliases": (_model([])[:-4] + struct.pack("<I", 1 << 30), r"declares 1073741824 aliases"),
    "name_not_utf8": (_model([_var(b"\xff\xfe", _F)]), r"the name of variable 0 .* is not UTF-8"),
    "name_without_nul": (_model([_var("x", _F)]).replace(_s("x"), struct.pack("<H", 2) + b"xy"),
                         r"not a NUL-terminated string"),
    "duplicate": (_model([_var("x", _F), _var("x", _F)]), r"holds variable 'x' twice"),
    "alias_to_nothing": (_model([_var("x", _F)], [("y", "z")]), r"alias 'y' points to 'z', which the file does not"),
    "alias_repeats_name": (_model([_var("x", _F)], [("x", "x")]), r"alias 'x' repeats a variable or alias name"),
    "trailing": (_small() + b"\0\0", r"has 2 bytes after its last alias"),
    "int8_quantized": (_model([_var("l/weight", np.ones((2, 2), np.int8)),
                               _var("l/weight_scale", np.ones(2, np.float32))]),
                       r"quantized \(int8\) CTranslate2 model \(l/weight\); quantized CTranslate2 models are not "
                       r"supported: convert with --quantization float16 or --quantization float32"),
    "int16_quantized": (_model([_var("l/weight", np.ones((2, 2), np.int16))]), r"quantized \(int16\)"),
}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_files_are_one_line_errors(tmp_path, case):
    blob, match = _BAD[case]
    path = _write(tmp_path / "model.bin", blob)
    message = _one_line_error(path)
    assert str(path) in message
    assert re.search(match, message), message


def test_every_truncation_is_a_user_error(tmp_path):
    blob = _small()
    for cut in range(len(blob)):
        _one_line_error(_write(tmp_path / f"cut{cut}.bin", blob[:cut]))
    assert ctranslate2.read(_write(tmp_path / "whole.bin", blob)).variables["c/w"].shape == (2, 3)


def test_hf_config_of_a_tiny_whisper_and_dispatch(tmp_path):
    folder = _whisper_folder(tmp_path / "w")
    config = ctranslate2.hf_config(folder)
    want = {"model_type": "whisper", "vocab_size": 16, "d_model": 8, "num_mel_bins": 4, "encoder_layers": 1,
            "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 24,
            "decoder_ffn_dim": 20, "max_source_positions": 6, "max_target_positions": 5,
            "decoder_start_token_id": 11, "eos_token_id": 10, "bos_token_id": 10, "pad_token_id": 10,
            "suppress_tokens": [1, 2], "begin_suppress_tokens": [3, 10], "lang_ids": [12], "alignment_heads": [[1, 0]]}
    assert {k: config[k] for k in want} == want and "no_timestamps_token_id" not in config
    assert models.load_hf_config(folder) == config  # CTranslate2's config.json is not returned as is
    weights = convert.read_weights(folder)
    assert weights["decoder/projection/weight"] is weights["decoder/embeddings/weight"]
    assert int(weights["decoder/num_heads"]) == 2
    # vocabulary.txt (one token a line) stands in for tokenizer.json
    (folder / "tokenizer.json").unlink()
    (folder / "vocabulary.txt").write_text("\n".join([f"t{i}" for i in range(10)] + ["<|endoftext|>",
                                                                                      "<|startoftranscript|>"]))
    assert ctranslate2.hf_config(folder) == config


@pytest.mark.parametrize("blob,tokenizer,match", [
    (_model(_whisper_vars(), spec="TransformerSpec"), True, r"holds a TransformerSpec, not a Whisper model"),
    (_model(_whisper_vars(), revision=4), True, r"WhisperSpec revision 4, newer than"),
    (_model(_whisper_vars(**{"decoder/pre_norm": 0})), True, r"sets decoder/pre_norm=0; ftjax's Whisper needs 1"),
    (_model(_whisper_vars(**{"decoder/activation": 1})), True,
     r"sets decoder/activation=gelu \(tanh approximation\); ftjax's Whisper needs gelu"),
    (_model(_whisper_vars(**{"decoder/rotary_dim": 4})), True, r"sets decoder/rotary_dim=4, a CTranslate2 setting"),
    (_model(_whisper_vars()[1:]), True, r"lacks encoder/conv1/weight: not the standard Whisper layout"),
    (_model(_whisper_vars()), False, r"has neither tokenizer.json nor vocabulary.txt"),
])
def test_hf_config_refusals_are_one_line(tmp_path, blob, tokenizer, match):
    folder = _whisper_folder(tmp_path / "w", blob, tokenizer=tokenizer)
    message = _one_line_error(folder, ctranslate2.hf_config)
    assert re.search(match, message), message
    assert _one_line_error(folder, models.load_hf_config) == message


def test_hf_config_refuses_bad_ct2_config_and_tokens(tmp_path):
    folder = _whisper_folder(tmp_path / "w")
    (folder / "config.json").write_text(json.dumps({"suppress_ids": "1, 2"}))
    assert "suppress_ids should be a list of token ids" in _one_line_error(folder, ctranslate2.hf_config)
    (folder / "config.json").write_text("{")
    assert "is not valid JSON" in _one_line_error(folder, ctranslate2.hf_config)
    (folder / "config.json").unlink()
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 99, "content": "<|endoftext|>"}]}))
    assert "no <|endoftext|> token below the vocabulary size 16" in _one_line_error(folder, ctranslate2.hf_config)


@pytest.mark.assets
def test_real_whisper_tiny_en(tmp_path):
    folder = pathlib.Path(require_asset("whisper_tiny_en"))
    m = ctranslate2.read(folder / "model.bin")
    assert (m.spec, m.revision, m.binary_version) == ("WhisperSpec", 3, 6)
    assert m.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert len(m.variables) == 149  # 148 stored + the alias
    arrays = {k: v for k, v in m.variables.items() if k not in m.aliases and np.ndim(v)}
    assert sum(v.size for v in arrays.values()) == 37_764_864  # 37.76M (the fused k biases, zeros, included)
    emb = m.variables["decoder/embeddings/weight"]
    assert emb.shape == (51864, 384) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert m.variables["encoder/conv1/weight"].shape == (384, 80, 3)
    config = ctranslate2.hf_config(folder)
    assert {k: config[k] for k in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                                   "decoder_attention_heads", "vocab_size", "num_mel_bins", "encoder_ffn_dim",
                                   "max_source_positions", "max_target_positions")} == {
        "d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
        "decoder_attention_heads": 6, "vocab_size": 51864, "num_mel_bins": 80, "encoder_ffn_dim": 1536,
        "max_source_positions": 1500, "max_target_positions": 448}
    assert (config["decoder_start_token_id"], config["eos_token_id"], config["no_timestamps_token_id"]) == (
        50257, 50256, 50362)
    assert config["begin_suppress_tokens"] == [220, 50256] and len(config["alignment_heads"]) == 8
    assert models.load_hf_config(folder) == config
    weights = convert.read_weights(folder)
    assert weights.keys() == m.variables.keys()
    np.testing.assert_array_equal(weights["decoder/layer_3/ffn/linear_1/bias"],
                                  m.variables["decoder/layer_3/ffn/linear_1/bias"])
