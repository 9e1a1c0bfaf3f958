"""Whisper in Flax against outputs of the reference implementation (HF transformers, PyTorch).

Fixtures come from tests/fixtures/make_whisper_fixtures.py (a random HF model with
different encoder/decoder depths, heads and widths; its CTranslate2 conversion); no
torch is needed here.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import convert, methods, models, tree
from ftjax.convert import whisper as whisper_convert
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError, one_line
from ftjax.models import whisper
from ftjax.models.layers import Peft
from tests import conftest, family_checks

FIXTURES = family_checks.FIXTURES / "whisper"
FOLDER = FIXTURES / "tiny_random"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "tiny_random_outputs.npz"))


@pytest.fixture(scope="module")
def hf_tensors() -> dict[str, np.ndarray]:
    return convert.read_weights(FOLDER)


def _bare(variables: dict) -> dict:
    """Converted variables ({collection: {"whisper": ...}}) for a bare, unnamed Whisper module."""
    return {collection: value["whisper"] for collection, value in variables.items()}


@pytest.fixture(scope="module")
def converted():
    """(the fixture's WhisperConfig, Whisper module, converted variables {"params", "constants"})."""
    cfg = whisper.WhisperConfig.from_hf(models.load_hf_config(FOLDER))
    model = whisper.Whisper(cfg)
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 48)), jnp.zeros((1, 2), jnp.int32)))
    variables = _bare(convert.convert_variables(FOLDER, "whisper"))
    # nothing missing, extra or misshapen; the encoder's table is a constant, not a parameter
    assert ({k: v.shape for k, v in tree.flatten(variables).items()}
            == {k: v.shape for k, v in tree.flatten(fresh).items()})
    assert set(variables) == {"params", "constants"} and list(tree.flatten(variables["constants"])) == [
        "encoder/positions"]
    return cfg, model, variables


@pytest.fixture(scope="module")
def step(converted):
    """decode_step jitted once: (variables, ids [B, 1], cache, index) -> (logits, cache)."""
    _, model, _ = converted
    return jax.jit(lambda v, ids, cache, index: model.apply(v, ids, cache, index, method="decode_step"))


def _with_params(variables: dict, flat_params: dict) -> dict:
    return {**variables, "params": tree.unflatten(flat_params)}


def _encode(converted, features):
    _, model, variables = converted
    return model.apply(variables, features, method="encode")


def test_encoder_and_teacher_forced_logits_match_hf(ref, converted):
    _, model, variables = converted
    encoded = _encode(converted, ref["input_features"])
    np.testing.assert_allclose(encoded, ref["encoder_last_hidden_state"], atol=1e-4)
    ids = ref["decoder_input_ids"].astype(np.int32)
    logits = model.apply(variables, ids, encoded, method="decode")
    assert logits.dtype == jnp.float32 and logits.shape == (2, 9, 120)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)
    np.testing.assert_allclose(model.apply(variables, ref["input_features"], ids), logits, atol=1e-6)


def test_greedy_with_the_cache_matches_hf_generate(ref, converted, step):
    _, model, variables = converted
    prompt, want = ref["greedy_ids"][:, :2].astype(np.int32), ref["greedy_ids"]
    encoded = _encode(converted, ref["input_features"])
    cache = model.apply(variables, encoded, want.shape[1], method="init_cache")
    assert cache["layer_0"]["key"].shape == (2, want.shape[1], 2, 16)  # [B, max_length, H, Dh]
    assert cache["layer_2"]["cross_value"].shape == (2, 24, 2, 16)  # [B, P, H, Dh]
    logits, cache = jax.jit(lambda v, ids, c: model.apply(v, ids, c, 0, method="decode_step"))(
        variables, prompt, cache)  # the two-token prefill
    ids = [prompt]
    for index in range(prompt.shape[1], want.shape[1]):
        ids.append(np.asarray(jnp.argmax(logits[:, -1], -1), np.int32)[:, None])
        logits, cache = step(variables, ids[-1], cache, jnp.int32(index))  # traced index: one compile
    np.testing.assert_array_equal(np.concatenate(ids, 1), want)
    assert len(set(want[0, 2:]) | set(want[1, 2:])) > 3  # the reference does not repeat one token


def test_decode_step_equals_teacher_forcing(ref, converted, step):
    _, model, variables = converted
    ids = ref["decoder_input_ids"].astype(np.int32)
    encoded = _encode(converted, ref["input_features"])
    full = model.apply(variables, ids, encoded, method="decode")
    cache = model.apply(variables, encoded, 16, method="init_cache")  # longer than needed: masked
    first, cache = model.apply(variables, ids[:, :4], cache, 0, method="decode_step")
    parts = [first]
    for index in range(4, ids.shape[1]):
        logits, cache = step(variables, ids[:, index:index + 1], cache, jnp.int32(index))
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, 1), full, atol=1e-5)
    # the cache is a batch-first pytree: reordering rows (beam search) reorders the outputs
    swapped = jax.tree.map(lambda x: jnp.take(x, jnp.array([1, 0]), axis=0), cache)
    a, _ = step(variables, ids[::-1, -1:], swapped, jnp.int32(ids.shape[1]))
    b, _ = step(variables, ids[:, -1:], cache, jnp.int32(ids.shape[1]))
    np.testing.assert_allclose(a, b[::-1], atol=1e-6)


def test_key_bias_changes_no_output(ref, converted):
    """HF's k_proj has no bias and the export drops ours: a key bias shifts every score of a query alike."""
    _, model, variables = converted
    rs = np.random.RandomState(0)
    flat = {k: rs.randn(*v.shape).astype(np.float32) if k.endswith("key/bias") else v
            for k, v in tree.flatten(variables["params"]).items()}
    ids = ref["decoder_input_ids"].astype(np.int32)
    logits = model.apply(_with_params(variables, flat), ref["input_features"], ids)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_the_checkpoints_encoder_position_table_is_used(ref, hf_tensors, converted):
    """CTranslate2 adds the table its file stores (float16-rounded): ftjax loads it rather than computing one."""
    _, model, variables = converted
    ct2 = _ct2_names(hf_tensors)
    table = ct2["encoder/position_encodings/encodings"]
    perturbed = table + 0.05 * np.random.RandomState(3).randn(*table.shape).astype(np.float32)
    loaded = _bare(tree.unflatten(whisper_convert.convert({**ct2, "encoder/position_encodings/encodings": perturbed})))
    np.testing.assert_array_equal(loaded["constants"]["encoder"]["positions"], perturbed)  # far from a sinusoid: loaded
    encoded = model.apply(loaded, ref["input_features"], method="encode")
    assert np.abs(np.asarray(encoded) - ref["encoder_last_hidden_state"]).max() > 1e-2
    # only the table differs: putting the fixture's table back restores HF's output
    restored = {**loaded, "constants": variables["constants"]}
    np.testing.assert_allclose(model.apply(restored, ref["input_features"], method="encode"),
                               ref["encoder_last_hidden_state"], atol=1e-4)


def test_the_position_table_is_model_state_no_train_step_changes(ref):
    """The table rides in TrainState.model_state: outside params, so no optimizer or method reaches it."""
    from ftjax import step as step_lib
    from ftjax.models.family import EncoderOptions
    from ftjax.tasks import speech

    variables = convert.convert_variables(FOLDER, "whisper")
    cfg = whisper.WhisperConfig.from_hf(models.load_hf_config(FOLDER))
    model = speech.SpeechSeq2SeqModel("whisper", cfg, EncoderOptions())

    class Task:  # any loss that reaches every encoder parameter
        def loss(self, logits, batch):
            return jnp.mean(jnp.square(logits)), {}

    params, model_state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    assert list(model_state) == ["constants"] and not any("encoder/positions" in k for k in tree.flatten(params))
    tx = optax.adam(1e-2)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(0)), model_state=model_state)
    batch = {"input_features": ref["input_features"], "decoder_input_ids": ref["decoder_input_ids"].astype(np.int32)}
    new, metrics = jax.jit(step_lib.make_train_step(model, tx, Task()))(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert np.abs(np.asarray(new.params["whisper"]["encoder"]["conv1"]["kernel"])
                  - params["whisper"]["encoder"]["conv1"]["kernel"]).max() > 1e-3  # the encoder did train
    assert jax.tree.structure(new.model_state) == jax.tree.structure(model_state)
    np.testing.assert_array_equal(new.model_state["constants"]["whisper"]["encoder"]["positions"],
                                  model_state["constants"]["whisper"]["encoder"]["positions"])


def _ct2_layer(m: dict[str, np.ndarray], stack: str, i: str) -> dict[str, np.ndarray]:
    """One layer's CTranslate2 variables from HF tensors `m` (names without "model.")."""
    hf, ct, out = f"{stack}.layers.{i}.", f"{stack}/layer_{i}/", {}
    linears = [("self_attention/linear_0", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("self_attention/linear_1", ("self_attn.out_proj",)), ("ffn/linear_0", ("fc1",)),
               ("ffn/linear_1", ("fc2",))]
    norms = [("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")]
    if stack == "decoder":
        linears += [("attention/linear_0", ("encoder_attn.q_proj",)),
                    ("attention/linear_1", ("encoder_attn.k_proj", "encoder_attn.v_proj")),
                    ("attention/linear_2", ("encoder_attn.out_proj",))]
        norms.append(("attention/layer_norm", "encoder_attn_layer_norm"))
    for name, parts in linears:  # fused in (out, in) layout; HF's k_proj has no bias: CT2 writes zeros
        out[f"{ct}{name}/weight"] = np.concatenate([m[f"{hf}{p}.weight"] for p in parts])
        out[f"{ct}{name}/bias"] = np.concatenate([m.get(f"{hf}{p}.bias", np.zeros(len(m[f"{hf}{p}.weight"]),
                                                                                   np.float32)) for p in parts])
    for name, hf_name in norms:
        out[f"{ct}{name}/gamma"], out[f"{ct}{name}/beta"] = m[f"{hf}{hf_name}.weight"], m[f"{hf}{hf_name}.bias"]
    return out


def _ct2_names(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors renamed and fused as CTranslate2's Whisper converter writes them (float32)."""
    m = {k.removeprefix("model."): v for k, v in hf.items()}
    out = {"encoder/num_heads": np.int16(4), "decoder/num_heads": np.int16(2), "decoder/pre_norm": np.int8(1),
           "decoder/activation": np.int8(3), "decoder/scale_embeddings": np.int8(0), "decoder/alibi": np.int8(0),
           "decoder/start_from_zero_embedding": np.int8(0), "decoder/alignment_layer": np.int16(-1),
           "decoder/alignment_heads": np.zeros((2, 2), np.int16),
           "encoder/position_encodings/encodings": m["encoder.embed_positions.weight"],
           "decoder/position_encodings/encodings": m["decoder.embed_positions.weight"],
           "decoder/embeddings/weight": m["decoder.embed_tokens.weight"],
           "decoder/projection/weight": m["decoder.embed_tokens.weight"]}
    for conv in ("conv1", "conv2"):
        out.update({f"encoder/{conv}/{leaf}": m[f"encoder.{conv}.{leaf}"] for leaf in ("weight", "bias")})
    for stack in ("encoder", "decoder"):
        out.update({f"{stack}/layer_norm/gamma": m[f"{stack}.layer_norm.weight"],
                    f"{stack}/layer_norm/beta": m[f"{stack}.layer_norm.bias"]})
    for stack, i in {(k.split(".")[0], k.split(".")[2]) for k in m if ".layers." in k}:
        out.update(_ct2_layer(m, stack, i))
    return out


def test_ctranslate2_names_convert_to_the_hf_tree(hf_tensors):
    want = whisper_convert.convert(hf_tensors)
    synthetic = _ct2_names(hf_tensors)
    real = dict(np.load(FIXTURES / "tiny_random_ct2_variables.npz"))  # as ctranslate2 4.x names them
    assert set(synthetic) - {"decoder/alignment_heads"} <= set(real)
    for tensors in (synthetic, real):
        got = whisper_convert.convert(tensors)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_ctranslate2_model_bin_converts_to_the_hf_tree(hf_tensors):
    from ftjax.convert import ctranslate2
    got = whisper_convert.convert(ctranslate2.read(FIXTURES / "tiny_random_ct2" / "model.bin").variables)
    want = whisper_convert.convert(hf_tensors)
    assert got.keys() == want.keys()
    for k in want:  # a float16 file
        np.testing.assert_allclose(got[k], want[k], atol=2e-3, rtol=2e-3, err_msg=k)


def test_to_hf_round_trips_to_the_fixture_folders_tensors(hf_tensors, converted):
    cfg, _, variables = converted
    flat = tree.flatten({"whisper": variables["params"]})
    back = whisper_convert.to_hf(flat, cfg.max_source_positions)
    # exactly the keys and shapes HF's save_pretrained wrote: no proj_out, no k_proj bias
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in hf_tensors.items()}
    for k, v in hf_tensors.items():
        np.testing.assert_allclose(back[k], v, atol=1e-6 if "embed_positions" in k else 0, err_msg=k)
    again = whisper_convert.convert(back)
    for k, v in flat.items():
        np.testing.assert_array_equal(again["params/" + k], v, err_msg=k)


def _shapes(cfg, peft: Peft | None = None, frames: int = 48) -> dict[str, tuple]:
    model = whisper.Whisper(cfg, peft=peft or Peft())
    x, ids = jnp.zeros((1, cfg.num_mel_bins, frames)), jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, ids)["params"]
    return {k: v.shape for k, v in tree.flatten(shapes).items()}


def _variable_shapes(cfg, frames: int = 48) -> dict[str, tuple]:
    """Every variable of a Whisper named "whisper", as the converter names it ("params/whisper/...")."""
    model = whisper.Whisper(cfg)
    x, ids = jnp.zeros((1, cfg.num_mel_bins, frames)), jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, ids)
    return {f"{c}/whisper/{k}": v.shape for c, tree_ in shapes.items() for k, v in tree.flatten(tree_).items()}


def test_method_additions_sit_where_the_methods_expect(converted):
    cfg = converted[0]
    lora = [k for k in _shapes(cfg, Peft(lora_rank=2)) if "/lora_" in k]
    assert sorted(lora) == sorted(f"{s}/layer_{i}/attention/{p}/lora_{ab}"
                                  for s, n in (("encoder", 2), ("decoder", 3)) for i in range(n)
                                  for p in ("query", "value") for ab in "ab")
    houlsby = {k.split("/")[2] for k in _shapes(cfg, Peft(adapter="houlsby", adapter_size=4)) if "_adapter/" in k}
    assert houlsby == {"attention_adapter", "mlp_adapter"}
    pfeiffer = [k for k in _shapes(cfg, Peft(adapter="pfeiffer", adapter_size=4)) if "_adapter/" in k]
    assert pfeiffer and all("/mlp_adapter/" in k for k in pfeiffer)
    ia3 = [k for k in _shapes(cfg, Peft(ia3=True)) if "/ia3_" in k]
    assert len(ia3) == 2 * 5 and all(k.endswith(("/attention/ia3_key", "/attention/ia3_value")) for k in ia3)
    with pytest.raises(UserError, match="no soft prompts"):
        _shapes(cfg, Peft(prompt_tokens=2))


def test_ia3_merges_into_a_plain_model(ref, converted):
    cfg, _, variables = converted
    rs = np.random.RandomState(1)
    flat = tree.flatten(variables["params"])
    for k in list(flat):
        if k.endswith("/attention/key/kernel"):  # self-attention (cross-attention has no IA3)
            for which in ("key", "value"):
                flat[k.replace("key/kernel", f"ia3_{which}")] = (1 + 0.3 * rs.randn(cfg.d_model)).astype(np.float32)
    ids = ref["decoder_input_ids"].astype(np.int32)
    ia3 = whisper.Whisper(cfg, peft=Peft(ia3=True))
    scaled = ia3.apply(_with_params(variables, flat), ref["input_features"], ids)
    merged = {**variables, "params": methods.ia3.merge(tree.unflatten(flat))}
    np.testing.assert_allclose(whisper.Whisper(cfg).apply(merged, ref["input_features"], ids), scaled,
                               atol=1e-4)
    assert np.abs(np.asarray(scaled) - ref["logits"]).max() > 1e-2  # the vectors mattered


def test_dropout_acts_in_train_mode_only(ref, converted):
    cfg, _, variables = converted
    model = whisper.Whisper(cfg, dropout_override=0.3)
    ids = ref["decoder_input_ids"].astype(np.int32)
    run = jax.jit(lambda rng, train: model.apply(variables, ref["input_features"], ids, train=train,
                                                 rngs={"dropout": rng}), static_argnums=1)
    np.testing.assert_allclose(run(jax.random.key(0), False), ref["logits"], atol=1e-4)
    a, b = run(jax.random.key(0), True), run(jax.random.key(1), True)
    assert np.abs(np.asarray(a) - b).max() > 1e-2 and np.abs(np.asarray(a) - ref["logits"]).max() > 1e-2


def test_bfloat16_compute_keeps_float32_logits_and_params(ref, converted):
    cfg, _, variables = converted
    model = whisper.Whisper(cfg, dtype=jnp.bfloat16)
    encoded = model.apply(variables, ref["input_features"], method="encode")
    cache = model.apply(variables, encoded, 4, method="init_cache")
    logits, _ = model.apply(variables, ref["decoder_input_ids"][:, :2].astype(np.int32), cache, 0,
                            method="decode_step")
    assert encoded.dtype == jnp.bfloat16 and cache["layer_0"]["key"].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - ref["logits"][:, :2]).max() < 0.25 * np.abs(ref["logits"]).max()


def test_shorter_audio_uses_the_first_positions(converted):
    x = np.random.RandomState(2).randn(1, 16, 20).astype(np.float32)
    assert _encode(converted, x).shape == (1, 10, 32)


def test_tiny_en_shapes_equal_the_ctranslate2_tiny_en_files():
    """The real tiny.en variant against the shapes of faster-whisper-tiny.en's model.bin (no weights needed)."""
    d, ffn, vocab = 384, 1536, 51864
    zeros = lambda *shape: np.broadcast_to(np.float32(0), shape)  # noqa: E731 (no memory)
    ct2 = {"encoder/conv1/weight": zeros(d, 80, 3), "encoder/conv1/bias": zeros(d),
           "encoder/conv2/weight": zeros(d, d, 3), "encoder/conv2/bias": zeros(d),
           "encoder/position_encodings/encodings": whisper.sinusoids(1500, d), "encoder/num_heads": np.int16(6),
           "decoder/num_heads": np.int16(6), "decoder/embeddings/weight": zeros(vocab, d),
           "decoder/position_encodings/encodings": zeros(448, d)}
    norm = lambda p: {f"{p}/gamma": zeros(d), f"{p}/beta": zeros(d)}  # noqa: E731
    linear = lambda p, o, i: {f"{p}/weight": zeros(o, i), f"{p}/bias": zeros(o)}  # noqa: E731
    for stack in ("encoder", "decoder"):
        ct2.update(norm(f"{stack}/layer_norm"))
        for i in range(4):
            p = f"{stack}/layer_{i}"
            ct2.update({**norm(f"{p}/self_attention/layer_norm"), **linear(f"{p}/self_attention/linear_0", 3 * d, d),
                        **linear(f"{p}/self_attention/linear_1", d, d), **norm(f"{p}/ffn/layer_norm"),
                        **linear(f"{p}/ffn/linear_0", ffn, d), **linear(f"{p}/ffn/linear_1", d, ffn)})
            if stack == "decoder":
                ct2.update({**norm(f"{p}/attention/layer_norm"), **linear(f"{p}/attention/linear_0", d, d),
                            **linear(f"{p}/attention/linear_1", 2 * d, d), **linear(f"{p}/attention/linear_2", d, d)})
    got = {k: v.shape for k, v in whisper_convert.convert(ct2).items()}
    cfg = models.family("whisper").config(models.variant_config("whisper", "tiny.en"))
    assert _variable_shapes(cfg, frames=3000) == got
    assert got["constants/whisper/encoder/positions"] == (1500, d)


def test_real_tiny_en_ctranslate2_converts_into_the_tiny_en_variant():
    folder = conftest.require_asset("whisper_tiny_en")
    from ftjax.convert import ctranslate2
    flat = whisper_convert.convert(ctranslate2.read(f"{folder}/model.bin").variables)
    variant = models.variant_config("whisper", "tiny.en")
    assert {k: v.shape for k, v in flat.items()} == _variable_shapes(
        models.family("whisper").config(variant), frames=3000)
    table = flat["constants/whisper/encoder/positions"]  # float16 in the file: the sinusoid, rounded
    assert 0 < np.abs(table - whisper.sinusoids(1500, 384)).max() < 1e-3
    hf = models.load_hf_config(folder)
    assert {k: hf[k] for k in variant if k in hf} == {k: variant[k] for k in variant if k in hf}


def test_family_spec_variants_and_layout():
    spec = models.family("whisper")
    assert models.family_of({"model_type": "whisper"}, "test") == "whisper"
    assert spec.modality == "audio" and spec.hf_export.architecture == "WhisperForConditionalGeneration"
    sizes = {name: (c["d_model"], c["encoder_layers"], c["encoder_attention_heads"], c["vocab_size"])
             for name, c in spec.variants.items()}
    assert sizes == {"tiny": (64, 2, 2, 51865), "tiny_multilingual": (384, 4, 6, 51865), "tiny.en": (384, 4, 6, 51864),
                     "base": (512, 6, 8, 51865), "base.en": (512, 6, 8, 51864), "small": (768, 12, 12, 51865),
                     "small.en": (768, 12, 12, 51864)}
    cfg = spec.config(json.loads((FOLDER / "config.json").read_text()))
    assert (cfg.encoder_layers, cfg.decoder_layers, cfg.decoder_ffn_dim, cfg.init_std) == (2, 3, 56, 0.02)
    layout = spec.layout(cfg)
    assert layout.num_layers == 5
    for path in _shapes(cfg):
        hits = [g for g in layout.groups + layout.top if re.fullmatch(g, "whisper/" + path)]
        assert len(hits) == 1, (path, hits)


def _bad(tensors, words):
    with pytest.raises(ConvertError) as e:
        whisper_convert.convert(tensors)
    assert words in str(e.value) and one_line(e.value) == str(e.value), str(e.value)


def test_bad_checkpoints_are_one_line_errors(hf_tensors):
    _bad({**hf_tensors, "model.encoder.layers.0.self_attn.z_proj.weight": np.zeros((2, 2))}, "z_proj")
    _bad({**hf_tensors, "model.encoder.layers.0.encoder_attn.q_proj.weight": np.zeros((2, 2))}, "encoder_attn")
    _bad({k: v for k, v in hf_tensors.items() if "layers.1.fc2.bias" not in k}, "lacks 2 tensors")
    _bad({**hf_tensors, "model.decoder.layers.1.fc1.weight": np.zeros((56, 31), np.float32)}, "shape [31, 56]")
    _bad({**hf_tensors, "proj_out.weight": hf_tensors["model.decoder.embed_tokens.weight"] + 1}, "ties")
    _bad({**hf_tensors, "model.encoder.embed_positions.weight": np.ones((24, 30), np.float32)},
         "encoder positions have shape [24, 30], expected [max_source_positions, 32]")
    _bad({**hf_tensors, "model.encoder.embed_positions.weight": np.ones(24, np.float32)}, "shape [24]")
    _bad({k: v for k, v in hf_tensors.items() if "encoder.embed_positions" not in k}, "no encoder/positions")
    ct2 = _ct2_names(hf_tensors)
    _bad({**ct2, "decoder/activation": np.int8(1)}, "decoder/activation=1")
    _bad({**ct2, "decoder/layer_0/ffn/linear_0/weight_scale": np.ones(56)}, "quantized")
    _bad({**ct2, "encoder/layer_0/attention/linear_0/weight": np.ones((4, 4))}, "unknown variable")
    with pytest.raises(ConvertError, match="no place in an HF Whisper"):
        whisper_convert.to_hf({"whisper/encoder/layer_0/attention/ia3_key": np.zeros(2)})


def test_bad_inputs_are_one_user_error_line(converted):
    _, model, variables = converted
    cases = [(lambda: _encode(converted, np.zeros((1, 16, 50), np.float32)), "50 mel frames exceed the encoder's 48"),
             (lambda: _encode(converted, np.zeros((1, 80, 48), np.float32)), "[batch, 16 mel bins, frames]"),
             (lambda: model.apply(variables, np.zeros((1, 41), np.int32), np.zeros((1, 24, 32)),
                                  method="decode"), "decoder sequence length 41 exceeds"),
             (lambda: model.apply(variables, np.zeros((1, 24, 32)), 41, method="init_cache"),
              "cache length 41 exceeds the decoder's max_target_positions 40"),
             (lambda: model.apply({"params": variables["params"]}, np.zeros((1, 16, 48), np.float32),
                                  method="encode"), "no 'constants' collection"),
             (lambda: whisper.WhisperConfig.from_hf({"d_model": 30, "encoder_attention_heads": 4}),
              "d_model 30 is not divisible by encoder_attention_heads 4"),
             (lambda: whisper.WhisperConfig.from_hf({"activation_function": "mish"}), "'mish' is not supported")]
    for fn, words in cases:
        with pytest.raises(UserError) as e:
            fn()
        assert words in str(e.value) and one_line(e.value) == str(e.value), str(e.value)
