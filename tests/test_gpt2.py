"""GPT-2 against the reference implementation (HF transformers, PyTorch).

Fixtures come from tests/fixtures/make_gpt2_fixtures.py (a tied random GPT2LMHeadModel with
n_inner != 4 * n_embd, and an untied one with scale_attn_by_inverse_layer_idx); no torch is
needed here. The shared helpers live in tests/test_llama.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import convert, methods, models, tree
from ftjax.convert import gpt2 as gpt2_convert
from ftjax.convert.safetensors_io import ConvertError
from ftjax.errors import UserError
from ftjax.models import gpt2
from ftjax.models.layers import Peft
from tests import family_checks
from tests.test_llama import (
    assert_cache_decoding_equals_forward,
    assert_layout_covers_once,
    assert_one_line,
    assert_padding_free,
    assert_round_trip,
    build,
    converted,
    forward,
    greedy_ids,
    param_shapes,
    train_forward,
    with_additions,
)

FOLDERS = {"gpt2": "gpt2_tiny_random", "untied": "gpt2_tiny_random_untied"}
ref = family_checks.reference_fixture("gpt2")


def _inputs(ref):
    return ref["input_ids"].astype(np.int32), ref["attention_mask"].astype(np.int32)


@pytest.mark.parametrize("variant", list(FOLDERS))
def test_logits_match_hf(ref, variant):
    c = converted("gpt2", FOLDERS[variant])
    logits = forward(c.model)(c.params, *_inputs(ref))
    assert logits.dtype == jnp.float32 and logits.shape == (3, 10, 120)
    family_checks.assert_close_on_tokens(logits, ref[f"{variant}_logits"], ref["attention_mask"], 1e-4)


@pytest.mark.parametrize("variant", list(FOLDERS))
def test_greedy_over_decode_step_matches_hf_generate(ref, variant):
    c = converted("gpt2", FOLDERS[variant])
    got = greedy_ids(c.model, c.params, ref["prompt_ids"].astype(np.int32), ref["prompt_mask"].astype(np.int32), 8)
    np.testing.assert_array_equal(got, ref[f"{variant}_greedy"])


def test_padding_and_the_cache(ref):
    c = converted("gpt2", FOLDERS["gpt2"])
    assert_padding_free(c.model, c.params, *_inputs(ref))
    assert_cache_decoding_equals_forward(c.model, c.params, *_inputs(ref))


@pytest.mark.parametrize("variant", list(FOLDERS))
def test_convert_to_hf_round_trip_is_exact(variant):
    assert_round_trip("gpt2", FOLDERS[variant])


def test_prompt_and_prefix_decode_as_the_forward(ref):
    """Learned positions: the soft prompt takes positions 0..P-1 (+ prefix slots), the text follows."""
    c = converted("gpt2", FOLDERS["gpt2"])
    model = build("gpt2", c.cfg, Peft(prompt_tokens=3, prefix_tokens=2))
    params = with_additions(model, c.params)
    assert_padding_free(model, params, *_inputs(ref))
    assert_cache_decoding_equals_forward(model, params, *_inputs(ref))
    with pytest.raises(UserError) as e:  # 40 positions: 5 extra slots + 36 tokens
        forward(model)(params, jnp.ones((1, 36), jnp.int32), jnp.ones((1, 36), jnp.int32))
    assert_one_line(e, "40 positions")


def test_method_additions_and_lora_merge():
    c = converted("gpt2", FOLDERS["gpt2"])
    peft = Peft(lora_rank=2, lora_targets=gpt2.RECOMMENDED_LORA_TARGETS)
    lora = build("gpt2", c.cfg, peft)
    assert sorted(k for k in param_shapes(lora) if "/lora_" in k) == sorted(
        f"layer_{i}/{m}/lora_{ab}" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
        for ab in "ab")
    params = with_additions(lora, c.params)
    ids = np.array([[5, 6, 7, 8]], np.int32)
    merged = methods.lora.merge(params, peft)
    np.testing.assert_allclose(forward(c.model)(merged, ids, np.ones_like(ids)),
                               forward(lora)(params, ids, np.ones_like(ids)), atol=1e-4)
    with pytest.raises(UserError) as e:
        param_shapes(build("gpt2", c.cfg, Peft(lora_rank=2)))
    assert_one_line(e, "c_attn")
    ia3 = {k: v for k, v in param_shapes(build("gpt2", c.cfg, Peft(ia3=True))).items() if "/ia3_" in k}
    assert ia3 == {f"layer_{i}/{k}": s for i in range(2) for k, s in (
        ("attn/ia3_key", (32,)), ("attn/ia3_value", (32,)), ("mlp/ia3_ffn", (48,)))}
    houlsby = param_shapes(build("gpt2", c.cfg, Peft(adapter="houlsby", adapter_size=4)))
    assert {k.split("/")[1] for k in houlsby if "_adapter/" in k} == {"attention_adapter", "mlp_adapter"}


def test_dropout_acts_in_train_mode_only(ref):
    c = converted("gpt2", FOLDERS["gpt2"])  # the config's 0.1 embd/resid/attn dropout
    run = train_forward(c.model)
    a, b = run(c.params, *_inputs(ref), jax.random.key(0)), run(c.params, *_inputs(ref), jax.random.key(1))
    assert np.abs(np.asarray(a) - b).max() > 1e-2
    off = train_forward(build("gpt2", dataclasses.replace(c.cfg, attn_pdrop=0.0), dropout=0.0))
    np.testing.assert_allclose(off(c.params, *_inputs(ref), jax.random.key(0)), forward(c.model)(c.params, *_inputs(ref)),
                               atol=1e-5)


def test_bfloat16_compute_keeps_float32_logits(ref):
    c = converted("gpt2", FOLDERS["gpt2"])
    logits = forward(build("gpt2", c.cfg, dtype=jnp.bfloat16))(c.params, *_inputs(ref))
    keep = ref["attention_mask"].astype(bool)
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits)[keep] - ref["gpt2_logits"][keep]).max() < 0.1 * np.abs(ref["gpt2_logits"]).max()


def test_family_spec_variants_and_layout():
    spec = models.family("gpt2")
    assert models.family_of({"model_type": "gpt2"}, "test") == "gpt2"
    assert spec.hf_export.architecture == "GPT2LMHeadModel"
    assert set(spec.provides) == {"attention", "causal_lm"}
    base = spec.config(models.variant_config("gpt2", "gpt2"))
    assert base.max_position_embeddings == base.n_positions == 1024
    x = jnp.ones((1, 2), jnp.int32)
    assert tree.count_params(jax.eval_shape(lambda: build("gpt2", base).init(jax.random.key(0), x, x))) == 124_439_808
    for folder in FOLDERS.values():
        assert_layout_covers_once(spec, converted("gpt2", folder).cfg, "gpt2")
    with pytest.raises(UserError) as e:
        spec.config({**spec.variants["tiny"], "add_cross_attention": True})
    assert_one_line(e, "add_cross_attention")


def test_original_checkpoint_names_and_bad_tensors():
    tensors = convert.read_weights(family_checks.FIXTURES / FOLDERS["gpt2"])
    want = gpt2_convert.convert(tensors)
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}  # openai-community/gpt2's names
    old["h.0.attn.bias"] = np.tril(np.ones((1, 1, 40, 40), np.float32))  # the causal-mask buffers
    old["h.1.attn.masked_bias"] = np.float32(-1e4)
    got = gpt2_convert.convert(old)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for bad, words in (({**tensors, "transformer.h.0.attn.q_attn.weight": np.zeros((2, 2))}, "q_attn"),
                       ({**tensors, "lm_head.weight": np.zeros((120, 31))}, "lm_head.weight has shape [120, 31]"),
                       ({k: v for k, v in tensors.items() if ".h.0." not in k}, "layers are [1]")):
        with pytest.raises(ConvertError) as e:
            gpt2_convert.convert(bad)
        assert_one_line(e, words)
