"""The GGUF reader (ftjax.convert.gguf): a tiny GGUF written here, and the pinned SmolLM2 asset.

The tiny files are written with the `gguf` package's own GGUFWriter and quantizer (F32,
F16, Q8_0, Q4_1 tensors; llama.cpp's q/k row permutation applied as its converter does);
the reader's tensors must equal what gguf's own GGUFReader + dequantize give, un-permuted.

The asset test compares against tests/fixtures/smollm2_gguf_outputs.npz, written by
tests/fixtures/make_gguf_fixtures.py from transformers' own GGUF loading (torch).
"""

import json
import pathlib
import time

import gguf as gguf_pkg
import numpy as np
import pytest

from ftjax import convert, models
from ftjax.convert import gguf
from ftjax.data import tokenizer as tok_lib
from ftjax.errors import UserError
from tests import conftest

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "smollm2_gguf_outputs.npz"
Q = gguf_pkg.GGMLQuantizationType
TINY = {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "context": 128}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + sorted(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def _hf_tensors(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout LlamaForCausalLM tensors of the TINY shapes (norms near 1)."""
    rng = np.random.default_rng(seed)
    h, i = TINY["hidden"], TINY["intermediate"]
    d = h // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, h)
    for n in range(TINY["layers"]):
        shapes.update({f"model.layers.{n}.input_layernorm.weight": (h,),
                       f"model.layers.{n}.self_attn.q_proj.weight": (TINY["heads"] * d, h),
                       f"model.layers.{n}.self_attn.k_proj.weight": (TINY["kv_heads"] * d, h),
                       f"model.layers.{n}.self_attn.v_proj.weight": (TINY["kv_heads"] * d, h),
                       f"model.layers.{n}.self_attn.o_proj.weight": (h, TINY["heads"] * d),
                       f"model.layers.{n}.post_attention_layernorm.weight": (h,),
                       f"model.layers.{n}.mlp.gate_proj.weight": (i, h),
                       f"model.layers.{n}.mlp.up_proj.weight": (i, h),
                       f"model.layers.{n}.mlp.down_proj.weight": (h, i)})
    return {k: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s)
                ).astype(np.float32) for k, s in shapes.items()}


def _default_type(hf_name: str) -> Q:
    if hf_name.endswith("norm.weight"):
        return Q.F32
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return Q.Q8_0
    return Q.F16 if ".v_proj." in hf_name else Q.Q4_1


def write_tiny(path: pathlib.Path, *, arch: str = "llama", tied: bool = True, types=None, drop=(),
               extra: dict | None = None, lossless: bool = False, meta: dict | None = None
               ) -> dict[str, np.ndarray]:
    """Writes a tiny llama GGUF (with a byte-level BPE tokenizer) to `path`; returns its HF tensors.

    types: HF name -> ggml type, overriding the defaults (norms F32, embeddings Q8_0,
    v_proj F16, other projections Q4_1); lossless: every tensor F32. drop: HF names left
    out. extra: GGUF name -> (array, ggml type) added. meta: key -> (value, GGUFValueType) added.
    """
    tokens = _tokens()
    hf = _hf_tensors(len(tokens), tied)
    w = gguf_pkg.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["context"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["intermediate"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, (value, vtype) in (meta or {}).items():
        w.add_key_value(key, value, vtype)
    for name, arr in hf.items():
        if name in drop:
            continue
        if name.endswith("q_proj.weight"):
            arr = gguf.permute_rotary(arr, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            arr = gguf.permute_rotary(arr, TINY["kv_heads"])
        qtype = Q.F32 if lossless else (types or {}).get(name, _default_type(name))
        w.add_tensor(gguf.gguf_name(name), gguf_pkg.quants.quantize(arr, qtype), raw_dtype=qtype)
    for name, (arr, qtype) in (extra or {}).items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _stats(w: np.ndarray) -> np.ndarray:
    """As make_gguf_fixtures.stats: sum, sum |w|, and sums weighted by (row, column) index + 1."""
    w = w.astype(np.float64).reshape(w.shape[0], -1)
    rows, cols = np.arange(1, w.shape[0] + 1)[:, None], np.arange(1, w.shape[1] + 1)[None, :]
    return np.array([w.sum(), np.abs(w).sum(), (w * rows).sum(), (w * cols).sum()])


def _one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    assert isinstance(e.value, convert.ConvertError), type(e.value)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, write_tiny(path)


# ---- the tiny synthetic GGUF ----------------------------------------------------------------

def test_permutation_is_llama_cpps_and_round_trips():
    # llama.cpp interleaves each head's two rotary halves: GGUF row 2j is HF row j, row 2j+1 is HF row j + d/2
    hf = np.arange(2 * 8, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows
    np.testing.assert_array_equal(gguf.permute_rotary(hf, 2)[:, 0], [0, 4, 2, 6, 8, 12, 10, 14])
    w = np.random.default_rng(0).standard_normal((12 * 6, 5)).astype(np.float32)
    for heads in (1, 3, 12):
        np.testing.assert_array_equal(gguf.unpermute_rotary(gguf.permute_rotary(w, heads), heads), w)
    bias = np.arange(8.0)  # 1-D (a bias) permutes the same way
    np.testing.assert_array_equal(gguf.unpermute_rotary(gguf.permute_rotary(bias, 2), 2), bias)


def test_config_and_tensors_equal_ggufs_own_dequantize(tiny):
    path, hf = tiny
    assert gguf.is_gguf(path) and not gguf.is_gguf(__file__)
    m = gguf.read(path)
    assert m.config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(_tokens()),
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": pytest.approx(1e-5),
        "rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_scaling": None, "max_position_embeddings": 128, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2}
    assert m.tensors.keys() == hf.keys()
    assert m.types["model.embed_tokens.weight"] == "Q8_0" and m.types["model.norm.weight"] == "F32"
    assert m.types["model.layers.1.self_attn.k_proj.weight"] == "Q4_1"
    assert m.types["model.layers.0.self_attn.v_proj.weight"] == "F16"
    reader = gguf_pkg.GGUFReader(path)  # gguf's own reader, independent of ftjax's header parser
    assert len(reader.tensors) == len(hf)
    for t in reader.tensors:
        name = next(k for k in hf if gguf.gguf_name(k) == t.name)
        want = gguf_pkg.quants.dequantize(t.data, t.tensor_type)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            want = gguf.unpermute_rotary(want, TINY["heads"] if "q_proj" in name else TINY["kv_heads"])
        got = m.tensors[name]
        assert got.dtype == np.float32 and got.shape == hf[name].shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        # and close to the written HF tensor: the permutation was undone, not applied again
        tol = {"F32": 0, "F16": 1e-4, "Q8_0": 2e-3}.get(m.types[name], 0.05)
        np.testing.assert_allclose(got, hf[name], atol=tol, rtol=0, err_msg=name)
    assert gguf.read(path, dtype=np.float16).tensors["model.norm.weight"].dtype == np.float16


def test_lossless_untied_file_gives_back_the_hf_tensors_and_the_llama_params(tmp_path):
    path = tmp_path / "model" / "f32.gguf"
    path.parent.mkdir()
    hf = write_tiny(path, tied=False, lossless=True)
    m = gguf.read(path)
    assert m.config["tie_word_embeddings"] is False and set(m.types.values()) == {"F32"}
    for name, arr in hf.items():
        np.testing.assert_array_equal(m.tensors[name], arr, err_msg=name)
    # the folder hooks: weights, config, and the llama converter's params equal those of the HF tensors
    weights = convert.read_weights(path.parent)
    assert weights.keys() == hf.keys()
    assert models.load_hf_config(path.parent) == m.config
    from ftjax.convert import llama

    ours, want = llama.convert(weights), llama.convert(hf)
    assert ours.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(ours[k], want[k], err_msg=k)


def test_linear_rope_scaling_reaches_the_config(tmp_path):
    path = tmp_path / "linear.gguf"
    write_tiny(path, meta={"llama.rope.scaling.type": ("linear", gguf_pkg.GGUFValueType.STRING),
                           "llama.rope.scaling.factor": (4.0, gguf_pkg.GGUFValueType.FLOAT32)})
    config = gguf.read_config(path)
    assert config["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    llama_config = models.family("llama").config(config)
    assert (llama_config.rope_type, llama_config.rope_factor) == ("linear", 4.0)


def test_tokenizer_and_materialized_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    path, _ = tiny
    folder = gguf.materialize(path, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tiny.gguf", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert (folder / "tiny.gguf").resolve() == path.resolve()
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert [tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]] == SPECIALS[1:] + SPECIALS[2:] + [None]
    assert tc["chat_template"] == CHAT_TEMPLATE and tc["add_bos_token"] is False
    assert json.loads((folder / "config.json").read_text()) == gguf.read_config(path)
    vocab = {t: i for i, t in enumerate(_tokens())}
    want = [vocab["hello"], vocab["Ġw"], vocab["o"], vocab["r"], vocab["l"], vocab["d"], 2]
    for source in (folder, path.parent):  # the materialized folder; the bare GGUF's folder (cached)
        t = tok_lib.load_tokenizer(source)
        assert t.encode(["hello world<|im_end|>"], None, 64)[0][0] == want
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    assert gguf.materialize(path) == next((tmp_path / "cache" / "gguf").iterdir())  # reused
    import transformers  # the folder reads as an HF snapshot, without torch

    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok("hello world<|im_end|>").input_ids == want and hf_tok.eos_token == "<|im_end|>"


def test_unsupported_architecture_is_one_line(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny(path, arch="qwen2")
    msg = _one_line_error(gguf.read, path)
    assert msg.startswith("GGUF architecture 'qwen2' is not supported (supported: llama)"), msg
    assert "qwen2" in _one_line_error(models.load_hf_config, tmp_path)


def test_unsupported_quant_type_is_one_line(tmp_path):
    path = tmp_path / "q81.gguf"
    v = "model.layers.0.self_attn.v_proj.weight"
    block, size = gguf_pkg.GGML_QUANT_SIZES[Q.Q8_1]  # 32 values in 40 bytes
    raw = np.zeros((32, 64 // block * size), np.uint8)
    write_tiny(path, drop=(v,), extra={"blk.0.attn_v.weight": (raw, Q.Q8_1)})
    msg = _one_line_error(gguf.read, path)
    assert "tensor 'blk.0.attn_v.weight' is stored as Q8_1, which ftjax's GGUF reader does not support" in msg


def test_missing_unknown_and_misshapen_tensors_are_one_line(tmp_path):
    path = tmp_path / "a.gguf"
    write_tiny(path, drop=("model.layers.1.mlp.up_proj.weight",))
    assert "lacks 1 tensor(s) the config needs, e.g. 'blk.1.ffn_up.weight'" in _one_line_error(gguf.read, path)
    write_tiny(path, extra={"blk.0.ffn_gate_exps.weight": (np.zeros((2, 64), np.float32), Q.F32)})
    assert "tensor 'blk.0.ffn_gate_exps.weight' has no place in ftjax's llama name map" in _one_line_error(
        gguf.read, path)
    write_tiny(path, extra={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})
    assert "uses RoPE scaling (the rope_freqs.weight tensor)" in _one_line_error(gguf.read, path)
    write_tiny(path, meta={"llama.rope.scaling.type": ("yarn", gguf_pkg.GGUFValueType.STRING)})
    assert "uses RoPE scaling (llama.rope.scaling.type='yarn')" in _one_line_error(gguf.read, path)
    k = "model.layers.0.self_attn.k_proj.weight"
    write_tiny(path, drop=(k,), extra={"blk.0.attn_k.weight": (np.zeros((64, 64), np.float32), Q.F32)})
    assert "tensor 'blk.0.attn_k.weight' (model.layers.0.self_attn.k_proj.weight) has shape [64, 64], the config " \
           "needs [32, 64]" in _one_line_error(gguf.read, path)
    write_tiny(tmp_path / "b.gguf")
    assert "several GGUF files (a.gguf, b.gguf)" in _one_line_error(convert.read_weights, tmp_path)


def test_truncated_and_corrupt_files_are_one_line(tiny, tmp_path):
    path, _ = tiny
    blob = path.read_bytes()
    header = gguf.read_header(path)
    end = max(t.start + t.nbytes for t in header.tensors.values())  # past it: the writer's trailing padding
    cuts = sorted({*range(0, 64), *range(64, end, max(1, end // 97)), end - 1})
    bad = tmp_path / "cut.gguf"
    for cut in cuts:
        bad.write_bytes(blob[:cut])
        msg = _one_line_error(gguf.read, bad)
        assert ("truncated" in msg) if cut >= 4 else ("truncated" in msg or "not a GGUF file" in msg), (cut, msg)
    bad.write_bytes(b"GGML" + blob[4:])
    assert "is not a GGUF file" in _one_line_error(gguf.read, bad)
    bad.write_bytes(blob[:4] + (1).to_bytes(4, "little") + blob[8:])
    assert "is GGUF version 1; ftjax reads versions 2, 3" in _one_line_error(gguf.read, bad)
    bad.write_bytes(blob[:4] + (3).to_bytes(4, "big") + blob[8:])
    assert "big-endian" in _one_line_error(gguf.read, bad)
    bad.write_bytes(blob[:16] + (2**62).to_bytes(8, "little") + blob[24:])  # the metadata count
    assert "announces 4611686018427387904 metadata entries" in _one_line_error(gguf.read, bad)
    first_type = 24 + 8 + len("general.architecture")  # the first key's value type
    bad.write_bytes(blob[:first_type] + (77).to_bytes(4, "little") + blob[first_type + 4:])
    assert "has value type 77, which GGUF does not define" in _one_line_error(gguf.read, bad)
    assert "does not exist" in _one_line_error(gguf.read, tmp_path / "nope.gguf")


def test_corrupt_headers_give_one_line_errors_or_a_model(tiny, tmp_path):
    path, _ = tiny
    blob = path.read_bytes()
    header_end = min(t.start for t in gguf.read_header(path).tensors.values())
    rng = np.random.default_rng(0)
    bad, outcomes = tmp_path / "bad.gguf", {"read": 0, "refused": 0}
    for _ in range(300):
        b = bytearray(blob)
        for pos in rng.integers(0, header_end, rng.integers(1, 4)):
            b[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            with np.errstate(all="ignore"):  # a corrupted scale may dequantize to inf/nan: still a model
                gguf.read(bad)
            outcomes["read"] += 1
        except convert.ConvertError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["read"] and outcomes["refused"], outcomes
    b = bytearray(blob)  # a block count no file could back: refused before anything loops over it
    key = blob.index(b"llama.block_count") + len("llama.block_count")
    b[key + 4:key + 8] = (2**31).to_bytes(4, "little")  # after the value type (u32)
    bad.write_bytes(bytes(b))
    assert "llama.block_count=2147483648 needs 9 tensors a block" in _one_line_error(gguf.read, bad)


def test_a_bad_gguf_is_one_line_from_the_cli(tiny, tmp_path, capsys):
    from ftjax.convert import __main__ as convert_main

    path, _ = tiny
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(gguf.read_config(path)))  # as materialize writes
    (tmp_path / "m" / "model.gguf").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SystemExit) as e:
        convert_main.main([str(tmp_path / "m"), str(tmp_path / "out"), "--family=llama"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftjax: error:") and "truncated" in err and "\n" not in err, err


# ---- the real SmolLM2-135M-Instruct Q4_1 GGUF against transformers ---------------------------

@pytest.mark.assets
def test_smollm2_gguf_matches_transformers():
    import jax
    import jax.numpy as jnp

    from ftjax import decoding, tree
    from ftjax.models.family import EncoderOptions

    started = time.perf_counter()
    folder = pathlib.Path(conftest.require_asset("smollm2_135m_instruct"))
    ref = dict(np.load(FIXTURE))
    path = gguf.find_gguf(folder)
    m = gguf.read(path)
    hf_config = json.loads(str(ref["config"]))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "model_type"):
        assert m.config[key] == hf_config[key], key
    assert m.config["rope_theta"] == hf_config["rope_parameters"]["rope_theta"] == 100000.0
    assert len(m.tensors) == 272 and sum(v.size for v in m.tensors.values()) == 134_515_008
    assert {m.types[k] for k in m.types if k.endswith("proj.weight")} == {"Q4_1"}
    assert m.types["model.embed_tokens.weight"] == "Q8_0"
    # tensors: the rows kept, and sums weighted by row and column index (they see a permutation)
    names = [k[:-len(":rows")] for k in ref if k.endswith(":rows")]
    assert len(names) == 7
    for name in names:
        w = m.tensors[name]
        np.testing.assert_allclose(w[ref[f"{name}:index"]], ref[f"{name}:rows"], atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_allclose(_stats(w), ref[f"{name}:stats"], rtol=1e-9, atol=1e-6, err_msg=name)
    # the tokenizer built from the metadata gives transformers' ids (the third text is the chat template's)
    texts, lengths = [str(t) for t in ref["texts"]], ref["lengths"]
    tok = tok_lib.load_tokenizer(folder)
    for text, ids, n in zip(texts, ref["ids"], lengths):
        assert tok.encode([text], None, 512)[0][0] == ids[:n].tolist(), text
    assert texts[2].startswith("<|im_start|>system\n") and texts[2].endswith("<|im_start|>assistant\n")
    # ftjax's Llama on the dequantized weights: last-position logits and greedy ids, one jitted call
    family = models.family("llama")
    config = family.config(models.load_hf_config(folder))
    model = family.encoder(config, EncoderOptions(), "llama")
    params = tree.unflatten(family.converter_module().convert(m.tensors))["params"]["llama"]
    del m
    variables = {"params": params}
    new, eos = ref["greedy"].shape[1], int(hf_config["eos_token_id"])
    width = int(lengths[:3].max())
    prompt = np.full((3, width), eos, np.int32)  # left-padded
    mask = np.zeros((3, width), np.int32)
    for r in range(3):
        prompt[r, width - lengths[r]:] = ref["ids"][r, :lengths[r]]
        mask[r, width - lengths[r]:] = 1

    @jax.jit
    def run(variables, prompt, mask):
        def step(tokens, cache, index):
            return model.apply(variables, tokens, cache, index, method="decode_step")

        cache = model.apply(variables, mask, width + new, method="init_cache")
        last = model.apply(variables, prompt, mask)[:, -1]
        return last, decoding.greedy(step, cache, prompt, max_new_tokens=new, eos_id=eos)

    t0 = time.perf_counter()
    last, ids = jax.device_get(run(variables, jnp.asarray(prompt), jnp.asarray(mask)))
    print(f"\nSmolLM2 GGUF: jit+run {time.perf_counter() - t0:.1f} s, "
          f"total {time.perf_counter() - started:.1f} s")
    diff = np.abs(last - ref["logits"]).max()
    print(f"max |logits - transformers| = {diff:.2e} (logit scale {np.abs(ref['logits']).max():.1f})")
    # float32 on both sides: what differs is the summation order (XLA vs torch) through 30 layers, measured
    # 6.5e-5 on logits up to 34; a wrong permutation, name or dequantization moves them by O(1)
    assert diff <= 1e-3, diff
    np.testing.assert_array_equal(np.argmax(last, -1), np.argmax(ref["logits"], -1))
    for r in range(3):
        want = [t for t in ref["greedy"][r].tolist() if t >= 0]
        got = ids[r].tolist()[:len(want)]
        assert got == want, (r, got, want)
        if len(want) < new:  # transformers stopped at EOS; ftjax pads with it
            assert want[-1] == eos and set(ids[r, len(want):].tolist()) <= {eos}
