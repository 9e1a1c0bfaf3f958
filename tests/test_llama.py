"""Llama-family decoder LMs (Llama, Qwen2, Mistral) against the reference implementation (HF, PyTorch).

Fixtures come from tests/fixtures/make_llama_fixtures.py (random models: GQA with a head
width that is not hidden / heads and an untied head; tied with llama3 rope and biases; Qwen2;
Mistral); no torch is needed here. The helpers above the tests serve tests/test_gpt2.py too.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import convert, decoding, methods, models, tree
from ftjax.convert import llama as llama_convert
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError, one_line
from ftjax.models import llama
from ftjax.models.family import EncoderOptions
from ftjax.models.layers import Peft
from tests import family_checks

FOLDERS = {"llama": "llama_tiny_random", "tied": "llama_tiny_random_tied", "qwen2": "llama_tiny_random_qwen2",
           "mistral": "llama_tiny_random_mistral"}
ref = family_checks.reference_fixture("llama")


# ---- helpers (tests/test_gpt2.py uses them too) ---------------------------------------------

class Converted(NamedTuple):
    """A fixture folder's config, bare (unnamed) model and params, strictly merged."""

    cfg: Any
    model: Any
    params: dict


def build(family: str, cfg, peft: Peft | None = None, **options):
    """The family's bare model (its params at the root) with `peft` and more EncoderOptions."""
    return models.family(family).encoder(cfg, EncoderOptions(peft=peft or Peft(), **options), None)


@functools.cache
def converted(family: str, folder: str) -> Converted:
    """The folder converted and strictly merged into the model's own tree: nothing missing or extra."""
    spec = models.family(family)
    path = family_checks.FIXTURES / folder
    cfg = spec.config(models.load_hf_config(path))
    model = build(family, cfg)
    fresh = family_checks.zeros_like_init(model, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    loaded = spec.load(convert.convert_variables(path, family), {"params": {family: fresh}})
    return Converted(cfg, model, tree.merge(loaded["params"][family], fresh))


@functools.cache
def forward(model):
    """model.apply jitted: (params, ids, mask) -> logits."""
    return jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))


@functools.cache
def train_forward(model):
    """model.apply in train mode, jitted: (params, ids, mask, dropout rng) -> logits."""
    return jax.jit(lambda p, ids, mask, rng: model.apply({"params": p}, ids, mask, train=True,
                                                         rngs={"dropout": rng}))


@functools.cache
def stepper(model):
    """decode_step jitted once per model (a traced index): (params, ids, cache, index) -> (logits, cache)."""
    return jax.jit(lambda p, ids, cache, index: model.apply({"params": p}, ids, cache, index, method="decode_step"))


@functools.cache
def prefill(model):
    """init_cache + the prefill, jitted: (params, ids [N, n], mask [N, n], max_length) -> (logits, cache)."""
    def run(p, ids, mask, max_length):
        cache = model.apply({"params": p}, mask, max_length, method="init_cache")
        return model.apply({"params": p}, ids, cache, 0, method="decode_step")
    return jax.jit(run, static_argnums=3)


def with_additions(model, params: dict, seed: int = 0, scale: float = 0.3) -> dict:
    """`params` plus the model's method additions (the params it has that `params` lacks), random."""
    x = jnp.ones((1, 4), jnp.int32)
    shapes = tree.flatten(jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))["params"])
    flat, rs = tree.flatten(params), np.random.RandomState(seed)
    for path, s in shapes.items():
        if path not in flat:
            flat[path] = (scale * rs.randn(*s.shape)).astype(np.float32)
    return tree.unflatten(flat)


def param_shapes(model) -> dict[str, tuple]:
    x = jnp.ones((1, 4), jnp.int32)
    return {k: v.shape for k, v in tree.flatten(jax.eval_shape(lambda: model.init(jax.random.key(0), x, x))[
        "params"]).items()}


def cached_logits(model, params, ids, mask, first_tokens: int, max_length: int):
    """The logits of ids [B, T] fed as a prefill of `first_tokens` tokens, then one token a step."""
    first, cache = prefill(model)(params, ids[:, :first_tokens], mask[:, :first_tokens], max_length)
    parts, step = [first], stepper(model)
    for index in range(first_tokens, ids.shape[1]):
        logits, cache = step(params, ids[:, index:index + 1], cache, jnp.int32(index))
        parts.append(logits)
    return np.concatenate(parts, 1), cache


def greedy_ids(model, params, prompt_ids, prompt_mask, new_tokens: int) -> np.ndarray:
    """ftjax.decoding.greedy over decode_step (no EOS: eos_id -1), jitted whole."""
    @jax.jit
    def run(p, ids, mask):
        cache = model.apply({"params": p}, mask, ids.shape[1] + new_tokens, method="init_cache")
        step = lambda t, c, i: model.apply({"params": p}, t, c, i, method="decode_step")  # noqa: E731
        return decoding.greedy(step, cache, ids, max_new_tokens=new_tokens, eos_id=-1)
    return np.asarray(run(params, prompt_ids, prompt_mask))


def assert_cache_decoding_equals_forward(model, params, ids, mask) -> None:
    """Prefill 4 + single steps == the full forward on the real tokens; rows reorder with the cache."""
    full = forward(model)(params, ids, mask)
    steps, cache = cached_logits(model, params, ids, mask, 4, ids.shape[1] + 3)  # a longer cache: masked
    family_checks.assert_close_on_tokens(steps, full, mask, 1e-5)
    order = jnp.array([2, 0, 1])
    swapped = jax.tree.map(lambda x: jnp.take(x, order, axis=0), cache)
    step, last = stepper(model), ids[:, -1:]
    a, _ = step(params, last[order], swapped, jnp.int32(ids.shape[1]))
    b, _ = step(params, last, cache, jnp.int32(ids.shape[1]))
    np.testing.assert_allclose(a, np.asarray(b)[np.asarray(order)], atol=1e-6)


def assert_padding_free(model, params, ids, mask) -> None:
    """Row 2 (3 left pads) and row 1 (right pads) give the logits of their tokens unpadded."""
    full = np.asarray(forward(model)(params, ids, mask))
    left = forward(model)(params, ids[2:, 3:], mask[2:, 3:])
    np.testing.assert_allclose(full[2, 3:], left[0], atol=1e-5)
    right = forward(model)(params, ids[1:2, :6], mask[1:2, :6])
    np.testing.assert_allclose(full[1, :6], right[0], atol=1e-5)


def assert_round_trip(family: str, folder: str) -> None:
    """convert -> to_hf gives back the file's tensors exactly, and to_hf -> convert the params."""
    tensors = convert.read_weights(family_checks.FIXTURES / folder)
    module = models.family(family).converter_module()
    flat = {k[len("params/"):]: v for k, v in module.convert(tensors).items()}
    back = module.to_hf(flat)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    again = module.convert(back)
    for k, v in flat.items():
        np.testing.assert_array_equal(again["params/" + k], v, err_msg=k)


def assert_one_line(error: pytest.ExceptionInfo, words: str) -> None:
    assert words in str(error.value) and one_line(error.value) == str(error.value), str(error.value)


def assert_layout_covers_once(spec, cfg, prefix: str) -> None:
    layout = spec.layout(cfg)
    assert layout.num_layers == len([k for k in layout.groups[1:]])
    for path in param_shapes(build(spec.name, cfg)):
        hits = [g for g in layout.groups + layout.top if re.fullmatch(g, f"{prefix}/{path}")]
        assert len(hits) == 1, (path, hits)


# ---- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(FOLDERS))
def test_logits_match_hf(ref, variant):
    c = converted("llama", FOLDERS[variant])
    logits = forward(c.model)(c.params, ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (3, 10, 120)
    family_checks.assert_close_on_tokens(logits, ref[f"{variant}_logits"], ref["attention_mask"], 1e-4)


@pytest.mark.parametrize("variant", list(FOLDERS))
def test_greedy_over_decode_step_matches_hf_generate(ref, variant):
    c = converted("llama", FOLDERS[variant])
    got = greedy_ids(c.model, c.params, ref["prompt_ids"].astype(np.int32), ref["prompt_mask"].astype(np.int32), 8)
    np.testing.assert_array_equal(got, ref[f"{variant}_greedy"])


def test_beam_search_repeats_and_reorders_the_cache(ref):
    """Every cache array is batch-first: beam search's repeat/take work; one beam is greedy."""
    c = converted("llama", FOLDERS["llama"])
    ids, mask = ref["prompt_ids"].astype(np.int32), ref["prompt_mask"].astype(np.int32)

    @functools.partial(jax.jit, static_argnums=3)
    def beams(p, ids, mask, k):
        cache = c.model.apply({"params": p}, mask, ids.shape[1] + 8, method="init_cache")
        step = lambda t, cache, i: c.model.apply({"params": p}, t, cache, i, method="decode_step")  # noqa: E731
        return decoding.beam_search(step, cache, ids, beams=k, max_new_tokens=8, eos_id=-1)

    np.testing.assert_array_equal(beams(c.params, ids, mask, 1), ref["llama_greedy"])
    assert beams(c.params, ids, mask, 3).shape == (2, 8)


def test_padding_and_the_cache(ref):
    c = converted("llama", FOLDERS["llama"])
    ids, mask = ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)
    assert_padding_free(c.model, c.params, ids, mask)
    assert_cache_decoding_equals_forward(c.model, c.params, ids, mask)
    _, cache = prefill(c.model)(c.params, ids[:, :4], mask[:, :4], 12)
    assert cache["layer_1"]["key"].shape == (3, 12, 2, 12)  # [N, max_length, kv_heads, head_dim]
    np.testing.assert_array_equal(cache["offset"], [0, 0, 3])
    np.testing.assert_array_equal(cache["mask"][2], [False] * 3 + [True] * 9)


@pytest.mark.parametrize("variant", list(FOLDERS))
def test_convert_to_hf_round_trip_is_exact(variant):
    assert_round_trip("llama", FOLDERS[variant])


def test_prompt_and_prefix_decode_as_the_forward(ref):
    """Soft prompt + prefixes: extra cache slots, the text's positions after them; left padding still free."""
    c = converted("llama", FOLDERS["llama"])
    model = build("llama", c.cfg, Peft(prompt_tokens=2, prefix_tokens=3, prefix_reparam=8))
    params = with_additions(model, c.params)
    assert {k.split("/")[0] for k in tree.flatten(params)} >= {"prompt", "prefix"}
    ids, mask = ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)
    assert_padding_free(model, params, ids, mask)
    assert_cache_decoding_equals_forward(model, params, ids, mask)
    _, cache = prefill(model)(params, ids[:, :4], mask[:, :4], 12)
    assert cache["layer_0"]["key"].shape == (3, 5 + 12, 2, 12) and cache["mask"].shape == (3, 17)
    plain = forward(c.model)(c.params, ids, mask)
    assert np.abs(np.asarray(forward(model)(params, ids, mask)) - plain).max() > 1e-2  # they matter


def test_lora_targets_the_projections_and_merges():
    c = converted("llama", FOLDERS["llama"])
    peft = Peft(lora_rank=2, lora_targets=llama.RECOMMENDED_LORA_TARGETS)
    lora = build("llama", c.cfg, peft)
    shapes = param_shapes(lora)
    modules = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
               "mlp/up_proj", "mlp/down_proj")
    assert sorted(k for k in shapes if "/lora_" in k) == sorted(
        f"layer_{i}/{m}/lora_{ab}" for i in range(2) for m in modules for ab in "ab")
    assert shapes["layer_0/self_attn/k_proj/lora_b"] == (2, 24)  # [r, kv_heads * head_dim]
    params = with_additions(lora, c.params)
    ids = np.array([[5, 6, 7, 8]], np.int32)
    mask = np.ones_like(ids)
    merged = methods.lora.merge(params, peft)
    np.testing.assert_allclose(forward(c.model)(merged, ids, mask), forward(lora)(params, ids, mask), atol=1e-4)
    with pytest.raises(UserError) as e:  # the config's default (BERT's attention/query|value) matches nothing
        param_shapes(build("llama", c.cfg, Peft(lora_rank=2)))
    assert_one_line(e, "q_proj")


def test_ia3_and_adapters_sit_in_every_layer():
    cfg = converted("llama", FOLDERS["llama"]).cfg
    ia3 = {k: v for k, v in param_shapes(build("llama", cfg, Peft(ia3=True))).items() if "/ia3_" in k}
    assert ia3 == {f"layer_{i}/{k}": s for i in range(2) for k, s in (
        ("self_attn/ia3_key", (24,)), ("self_attn/ia3_value", (24,)), ("mlp/ia3_ffn", (48,)))}
    houlsby = param_shapes(build("llama", cfg, Peft(adapter="houlsby", adapter_size=4)))
    assert {k.split("/")[1] for k in houlsby if "_adapter/" in k} == {"attention_adapter", "mlp_adapter"}
    pfeiffer = param_shapes(build("llama", cfg, Peft(adapter="pfeiffer", adapter_size=4)))
    assert {k.split("/")[1] for k in pfeiffer if "_adapter/" in k} == {"mlp_adapter"}


def test_lengths_past_the_positions_are_one_line_errors():
    c = converted("llama", FOLDERS["llama"])  # 64 positions
    long = jnp.ones((1, 65), jnp.int32)
    with pytest.raises(UserError) as e:
        c.model.apply({"params": c.params}, long, long)
    assert_one_line(e, "64 positions")
    with pytest.raises(UserError) as e:
        c.model.apply({"params": c.params}, jnp.ones((1, 60), jnp.int32), 65, method="init_cache")
    assert_one_line(e, "prompt + generated tokens 65")
    prompted = build("llama", c.cfg, Peft(prompt_tokens=4))
    with pytest.raises(UserError) as e:
        jax.eval_shape(lambda: prompted.init(jax.random.key(0), long[:, :61], long[:, :61]))
    assert_one_line(e, "4 prompt/prefix slots")
    mistral = converted("llama", FOLDERS["mistral"])  # sliding_window 24
    with pytest.raises(UserError) as e:
        mistral.model.apply({"params": mistral.params}, long[:, :25], long[:, :25])
    assert_one_line(e, "sliding_window 24")


def test_bfloat16_compute_keeps_float32_params_and_logits(ref):
    c = converted("llama", FOLDERS["tied"])
    model = build("llama", c.cfg, dtype=jnp.bfloat16)
    ids, mask = ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)
    logits, cache = prefill(model)(c.params, ids, mask, 10)
    assert cache["layer_0"]["value"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    keep = mask.astype(bool)
    assert np.abs(np.asarray(logits)[keep] - ref["tied_logits"][keep]).max() < 0.1 * np.abs(ref["tied_logits"]).max()


def test_dropout_acts_in_train_mode_only(ref):
    c = converted("llama", FOLDERS["llama"])
    ids, mask = ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)
    np.testing.assert_allclose(train_forward(c.model)(c.params, ids, mask, jax.random.key(0)),
                               forward(c.model)(c.params, ids, mask), atol=1e-5)  # HF's Llama has no dropout
    dropped = train_forward(build("llama", c.cfg, dropout=0.3))
    a, b = dropped(c.params, ids, mask, jax.random.key(0)), dropped(c.params, ids, mask, jax.random.key(1))
    assert np.abs(np.asarray(a) - b).max() > 1e-2


def test_family_spec_variants_and_layout():
    spec = models.family("llama")
    assert [models.family_of({"model_type": t}, "test") for t in ("llama", "mistral", "qwen2")] == ["llama"] * 3
    assert spec.modality == "text" and spec.hf_export.architecture == "LlamaForCausalLM"
    assert set(spec.provides) == {"attention", "causal_lm"}  # what the methods and the causal_lm task check
    smol = spec.config(models.variant_config("llama", "smollm2-135m"))
    assert (smol.num_hidden_layers, smol.hidden_size, smol.kv_heads, smol.dim, smol.rope_theta) == (30, 576, 3, 64,
                                                                                                  100000.0)
    assert tree.count_params(jax.eval_shape(lambda: build("llama", smol).init(
        jax.random.key(0), jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)))) == 134_515_008
    for folder in FOLDERS.values():
        c = converted("llama", folder)
        assert_layout_covers_once(spec, c.cfg, "llama")
    assert spec.layout(smol).num_layers == 30
    with pytest.raises(UserError) as e:
        spec.config({**llama.TINY_LLAMA, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    assert_one_line(e, "'yarn'")
    with pytest.raises(UserError) as e:
        spec.hf_export.check({"task": "classification"})
    assert_one_line(e, "LlamaForCausalLM")
    with pytest.raises(UserError) as e:
        spec.hf_export.check({"model_config": {"model_type": "qwen2"}})
    assert_one_line(e, "qwen2")


def test_tied_checkpoints_lm_head_loads_only_when_equal():
    path = family_checks.FIXTURES / FOLDERS["tied"]
    tensors = convert.read_weights(path)
    flat = llama_convert.convert({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    fresh = {"params": {"llama": {"word_embeddings": {}}}}
    loaded = llama.FAMILY.load(tree.unflatten(flat), fresh)
    assert "lm_head" not in loaded["params"]["llama"]
    flat["params/llama/lm_head/kernel"] = flat["params/llama/lm_head/kernel"] + 1
    with pytest.raises(UserError) as e:
        llama.FAMILY.load(tree.unflatten(flat), fresh)
    assert_one_line(e, "tie_word_embeddings")


def test_bad_checkpoints_are_one_line_errors():
    tensors = convert.read_weights(family_checks.FIXTURES / FOLDERS["llama"])
    for bad, words in (({**tensors, "model.layers.0.self_attn.z_proj.weight": np.zeros((2, 2))}, "z_proj"),
                       ({**tensors, "model.norm.bias": np.zeros(32)}, "has no 'bias'"),
                       ({**tensors, "lm_head.weight": np.zeros((12, 32))}, "lm_head.weight has shape [12, 32]"),
                       ({k: v for k, v in tensors.items() if "layers.0." not in k}, "layers are [1]")):
        with pytest.raises(ConvertError) as e:
            llama_convert.convert(bad)
        assert_one_line(e, words)
    no_prefix = {k.removeprefix("model."): v for k, v in tensors.items()}
    no_prefix["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(6, np.float32)  # old files' buffer
    assert llama_convert.convert(no_prefix).keys() == llama_convert.convert(tensors).keys()


@pytest.mark.parametrize("family, folder", [("llama", "llama_tiny_random"), ("llama", "llama_tiny_random_tied"),
                                            ("gpt2", "gpt2_tiny_random")])
def test_ia3_vectors_merge_into_the_plain_model_exactly(family, folder):
    c = converted(family, folder)
    ia3 = build(family, c.cfg, Peft(ia3=True))
    flat = tree.flatten(with_additions(ia3, c.params))
    rng = np.random.default_rng(0)
    for k in flat:
        if "/ia3_" in k:  # away from one, or merging would be trivially right
            flat[k] = rng.uniform(0.5, 1.5, np.shape(flat[k])).astype(np.float32)
    params = tree.unflatten(flat)
    ids = np.array([[5, 6, 7, 8, 9]], np.int32)
    mask = np.ones_like(ids)
    merged = methods.ia3.merge(params)
    assert not any("/ia3_" in k for k in tree.flatten(merged))
    np.testing.assert_allclose(forward(c.model)(merged, ids, mask), forward(ia3)(params, ids, mask), atol=1e-4)
