"""GPT-2 (Radford et al. 2019) in Flax Linen, HF GPT2LMHeadModel semantics.

Token + learned position embeddings, pre-LN layers (fused q|k|v projection "c_attn",
causal self-attention, "c_proj"; an MLP "c_fc" -> gelu_new -> "c_proj"), a final LayerNorm
and the output projection tied to the token embeddings (or an untied lm_head).

Parameter paths (a task creates the model under "gpt2"):
  gpt2/word_embeddings/embedding [V, D], gpt2/position_embeddings/embedding [n_positions, D]
                                      (HF wte, wpe; BERT's names, which prompt tuning's
                                      vocabulary init looks for)
  gpt2/layer_{i}/{ln_1,ln_2}/{scale,bias}
  gpt2/layer_{i}/attn/c_attn/{kernel [D, 3D] (q|k|v), bias}, gpt2/layer_{i}/attn/c_proj/{kernel, bias}
  gpt2/layer_{i}/mlp/{c_fc,c_proj}/{kernel, bias}
  gpt2/ln_f/{scale,bias}, gpt2/lm_head/kernel [D, V] (untied models only)
With a method's additions: .../{c_attn,c_proj,c_fc}/lora_{a,b} (LoRA; RECOMMENDED_LORA_TARGETS),
attn/ia3_{key,value} [D] and mlp/ia3_ffn [inner] (IA3), layer_{i}/{attention,mlp}_adapter/...,
gpt2/prompt [P, D], gpt2/prefix/...

The API, positions and cache are those of ftjax.models.llama.DecoderLM (see its module
docstring): __call__ / hidden / init_cache / decode_step. Dropout: embd_pdrop after the
embeddings, attn_pdrop on the attention probabilities, resid_pdrop on each residual branch
(EncoderOptions.dropout replaces embd_pdrop and resid_pdrop).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec
from ftjax.models.layers import (
    ACTIVATIONS, Dropout,
    Adapter,
    Dense,
    Peft,
    check_heads,
    config_from_hf,
)
from ftjax.models.layout import Layout
from ftjax.models.llama import (
    DecoderLM,
    Linear,
    attend,
    check_lora_targets,
    extend_kv,
    lm_export,
    lm_layout,
    tied_head_load,
)

RECOMMENDED_LORA_TARGETS = r".*/(c_attn|c_proj|c_fc)"


def _variant(n_embd: int, n_layer: int, n_head: int, n_positions: int = 1024) -> dict[str, Any]:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": n_embd,
            "n_layer": n_layer, "n_head": n_head, "n_positions": n_positions, "n_inner": None,
            "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": 50256, "eos_token_id": 50256,
            "tie_word_embeddings": True}


# "tiny": small random shapes for tests, with GPT-2's vocabulary (its tokenizer fits it).
VARIANTS = {"tiny": _variant(64, 2, 2, 256), "gpt2": _variant(768, 12, 12)}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The HF GPT2Config fields ftjax uses (same names)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    @property
    def max_position_embeddings(self) -> int:
        """n_positions, under the name the other families use."""
        return self.n_positions

    @property
    def inner(self) -> int:
        """The MLP width (n_inner, else 4 * n_embd)."""
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        cfg = config_from_hf(cls, hf)
        if cfg.activation_function not in ACTIVATIONS:
            raise UserError(f"activation_function={cfg.activation_function!r} is not supported "
                            f"({', '.join(ACTIVATIONS)})")
        if hf.get("add_cross_attention"):
            raise UserError("add_cross_attention=true: ftjax's GPT-2 is a decoder-only language model")
        check_heads(cfg.n_embd, cfg.n_head, "n_embd", "n_head")
        return cfg


def _layer_norm(cfg: GPT2Config, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=dtype, param_dtype=jnp.float32)


def _dense(cfg: GPT2Config, features: int, dtype, peft: Peft) -> Dense:
    return Dense(features, kernel_init=nn.initializers.normal(cfg.initializer_range), dtype=dtype, peft=peft)


class GPT2Attention(nn.Module):
    """Causal self-attention over the fused c_attn projection, with IA3, prefixes and the cache."""

    config: GPT2Config
    layer_index: int
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def setup(self):
        cfg, peft = self.config, self.peft
        self.c_attn = _dense(cfg, 3 * cfg.n_embd, self.dtype, peft)
        self.c_proj = _dense(cfg, cfg.n_embd, self.dtype, peft)
        if peft.ia3:
            self.ia3_key = self.param("ia3_key", nn.initializers.ones, (cfg.n_embd,), jnp.float32)
            self.ia3_value = self.param("ia3_value", nn.initializers.ones, (cfg.n_embd,), jnp.float32)
        self.drop = Dropout(cfg.attn_pdrop)

    def __call__(self, x, positions, bias, *, train: bool = False, prefix=None, cache=None, slot=None):
        del positions  # learned positions were added to the inputs
        cfg = self.config
        d = cfg.n_embd // cfg.n_head
        q, k, v = jnp.split(self.c_attn(x, train=train), 3, axis=-1)
        if self.peft.ia3:
            k, v = k * self.ia3_key.astype(k.dtype), v * self.ia3_value.astype(v.dtype)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.n_head, d)  # noqa: E731
        k, v, cache = extend_kv(split(k), split(v), prefix=prefix, cache=cache, slot=slot)
        scale = (d ** -0.5 if cfg.scale_attn_weights else 1.0) / (
            self.layer_index + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
        ctx = attend(split(q), k, v, bias, scale, lambda p: self.drop(p, deterministic=not train), self.dtype)
        return self.c_proj(ctx, train=train), cache


class GPT2MLP(nn.Module):
    """c_fc -> activation -> [IA3 "ia3_ffn"] -> c_proj."""

    config: GPT2Config
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        cfg, peft = self.config, self.peft
        init = nn.initializers.normal(cfg.initializer_range)
        h = Dense(cfg.inner, kernel_init=init, dtype=self.dtype, peft=peft, name="c_fc")(x, train=train)
        h = ACTIVATIONS[cfg.activation_function](h)
        if peft.ia3:
            h = h * self.param("ia3_ffn", nn.initializers.ones, (cfg.inner,), jnp.float32).astype(h.dtype)
        return Dense(cfg.n_embd, kernel_init=init, dtype=self.dtype, peft=peft, name="c_proj")(h, train=train)


class GPT2Block(nn.Module):
    """ln_1 -> attention -> [adapter] -> dropout -> residual; ln_2 -> MLP -> [adapter] -> dropout -> residual."""

    config: GPT2Config
    layer_index: int
    dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def setup(self):
        cfg, peft, dtype = self.config, self.peft, self.dtype
        self.ln_1, self.ln_2 = _layer_norm(cfg, dtype), _layer_norm(cfg, dtype)
        self.attn = GPT2Attention(cfg, self.layer_index, dtype, peft)
        self.mlp = GPT2MLP(cfg, dtype, peft)
        if peft.adapter == "houlsby":
            self.attention_adapter = Adapter(peft.adapter_size, peft.adapter_init_std, dtype)
        if peft.adapter in ("houlsby", "pfeiffer"):
            self.mlp_adapter = Adapter(peft.adapter_size, peft.adapter_init_std, dtype)
        self.drop = Dropout(self.dropout)

    def __call__(self, x, positions, bias, *, train: bool = False, prefix=None, cache=None, slot=None):
        h, cache = self.attn(self.ln_1(x), positions, bias, train=train, prefix=prefix, cache=cache, slot=slot)
        if self.peft.adapter == "houlsby":
            h = self.attention_adapter(h)
        x = x + self.drop(h, deterministic=not train)
        h = self.mlp(self.ln_2(x), train=train)
        if self.peft.adapter in ("houlsby", "pfeiffer"):
            h = self.mlp_adapter(h)
        return x + self.drop(h, deterministic=not train), cache


class GPT2(DecoderLM):
    """GPT2LMHeadModel; see the module docstring."""

    family_name = "gpt2"
    recommended_lora_targets = RECOMMENDED_LORA_TARGETS

    @property
    def max_positions(self) -> int:
        return self.config.n_positions

    @property
    def kv_heads(self) -> int:
        return self.config.n_head

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    @property
    def window(self) -> None:
        return None

    def setup(self):
        cfg, peft, dtype = self.config, self.peft, self.dtype
        init = nn.initializers.normal(cfg.initializer_range)
        embed = lambda n: nn.Embed(n, cfg.n_embd, dtype=dtype, param_dtype=jnp.float32,  # noqa: E731
                                   embedding_init=init)
        self.word_embeddings, self.position_embeddings = embed(cfg.vocab_size), embed(cfg.n_positions)
        hidden = cfg.resid_pdrop if self.dropout_override is None else self.dropout_override
        self.drop = Dropout(cfg.embd_pdrop if self.dropout_override is None else self.dropout_override)
        self.layers = [GPT2Block(cfg, i, hidden, dtype, peft, name=f"layer_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, False, init, dtype, peft)  # HF's has no bias
        self.setup_peft(cfg.n_embd)
        names = [f"layer_{i}/{m}" for i in range(cfg.n_layer) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc",
                                                                         "mlp/c_proj")]
        check_lora_targets(self, names + ([] if cfg.tie_word_embeddings else ["lm_head"]))

    def embed(self, ids):
        return self.word_embeddings(ids)

    def inputs(self, x, positions, train: bool):
        x = x + self.position_embeddings(positions).astype(x.dtype)
        return self.drop(x, deterministic=not train)

    def final(self, x):
        return self.ln_f(x)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.word_embeddings.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)


def layout(config: GPT2Config) -> Layout:
    return lm_layout(config.n_layer, r".*/ln_(1|2|f)/.*", (r".*/ln_f/.*",))


def _model(cfg: GPT2Config, opts: EncoderOptions, name: str) -> GPT2:
    return GPT2(cfg, dtype=opts.dtype, dropout_override=opts.dropout, peft=opts.peft, name=name)


FAMILY = FamilySpec(
    name="gpt2", model_types=("gpt2",), modality="text", config_class=GPT2Config, encoder=_model, layout=layout,
    converter="ftjax.convert.gpt2", variants=VARIANTS, provides=("attention", "causal_lm"),
    load=tied_head_load("gpt2"),
    hf_export=lm_export("GPT2LMHeadModel", "gpt2"))
