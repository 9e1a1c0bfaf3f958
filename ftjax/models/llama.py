"""Llama-style decoder-only language models (Llama, Mistral, Qwen2) in Flax Linen, HF semantics.

Pre-norm layers of RMSNorm, grouped-query self-attention with rotary positions (HF's
rotate_half convention; "default", "linear" and "llama3" rope types) and a SwiGLU MLP,
a final RMSNorm and an output projection, tied to the token embeddings or not.

Parameter paths (a task creates the model under "llama"):
  llama/word_embeddings/embedding [V, D]   (HF model.embed_tokens; BERT's name, which
                                           prompt tuning's vocabulary init looks for)
  llama/layer_{i}/{input_layernorm,post_attention_layernorm}/scale
  llama/layer_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel [in, out] (+ bias with attention_bias;
                                           Qwen2: q/k/v biases only)
  llama/layer_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel (+ bias with mlp_bias)
  llama/norm/scale, llama/lm_head/kernel [D, V] (untied models only)
With a method's additions: .../{q_proj,...}/lora_{a,b} (LoRA on the projections its regex
names: RECOMMENDED_LORA_TARGETS), self_attn/ia3_{key,value} [kv_heads * head_dim] and
mlp/ia3_ffn [intermediate] (IA3), layer_{i}/{attention,mlp}_adapter/... (adapters),
llama/prompt [P, D] (prompt tuning), llama/prefix/... (prefix tuning).

`DecoderLM` holds what the decoder-only families share (gpt2.py builds on it): the causal
and padding masks, positions, soft prompts and prefixes, and the KV cache, reached as

  model.apply(v, input_ids, attention_mask)                    -> logits f32 [B, T, V]
  model.apply(v, input_ids, attention_mask, method="hidden")   -> final normed states [B, T, D]
  model.apply(v, prompt_mask, max_length, method="init_cache") -> cache
  model.apply(v, token_ids, cache, index, method="decode_step") -> (logits f32 [N, n, V], cache)

Positions are cumsum(attention_mask) - 1 (clipped at 0), so a left-padded row gives the
logits of the same row unpadded. Prompt tuning's P vectors and prefix tuning's P' per-layer
keys/values sit before the text as E = P' + P "extra" slots; the text's positions then
start at E (as HF PEFT's prompt and prefix tuning number them).

The cache: {"layer_<i>": {"key", "value": [N, E + max_length, kv_heads, head_dim]} (compute
dtype), "mask": bool [N, E + max_length], "offset": int32 [N]}, every array batch-first. The
mask holds the prompt's mask at text slots 0..n-1 and True elsewhere (the causal mask hides
slots not yet written); offset is the row's number of left pads: the text token at cache
slot E + i has position E + i - offset. decode_step(ids, cache, index) writes its n tokens at
text slots index..index+n-1 (prefill: index 0) and attends causally to the valid slots.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError
from ftjax.models.family import EncoderOptions, FamilySpec, HFExport
from ftjax.models.layers import (
    ACTIVATIONS, Dropout,
    Adapter,
    Peft,
    PrefixEncoder,
    check_heads,
    config_from_hf,
)
from ftjax.models.layout import Layout

NEG = -1e9  # additive bias of a masked key (float32, so bf16 cannot overflow it)
RECOMMENDED_LORA_TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
ROPE_TYPES = ("default", "linear", "llama3")

# "tiny": small random shapes for tests, with SmolLM2's vocabulary (its tokenizer fits it).
TINY_LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.02,
}
SMOLLM2_135M = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.041666666666666664,
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The HF LlamaConfig fields ftjax uses (same names); rope settings flattened to scalars.

    Attributes beyond HF's: qkv_bias (Qwen2: q/k/v biases without an o_proj bias),
    rope_type and rope_* (the rope_parameters / rope_scaling dict), model_type.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim(self) -> int:
        """The per-head width."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Builds the config from a config.json dict (Llama, Mistral or Qwen2), ignoring unrelated keys."""
        model_type = hf.get("model_type", "llama")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", cls.rope_theta))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UserError(f"rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (only 1.0)")
        extra = {"rope_theta": rope["rope_theta"], "rope_type": rope_type}
        need = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
        missing = [k for k in need[rope_type] if k not in rope]
        if missing:
            raise UserError(f"the {rope_type} rope parameters lack {', '.join(missing)}")
        extra.update({f"rope_{k}": rope[k] for k in need[rope_type]})
        if rope_type == "llama3":
            extra["rope_original_max_position_embeddings"] = rope.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        if model_type == "qwen2":
            if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
                raise UserError("Qwen2 with sliding-window layers is not supported (use_sliding_window / "
                                "layer_types): ftjax attends over the full sequence")
            extra["qkv_bias"] = True
        if model_type != "mistral":  # Mistral's window is checked against lengths; Qwen2's is off (above)
            extra["sliding_window"] = None
        eos = hf.get("eos_token_id")  # Llama 3 lists several
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in hf.items() if k in fields and k not in extra and k != "eos_token_id"}
        cfg = config_from_hf(cls, {**kept, **extra, "model_type": model_type})
        if eos is not None:
            cfg = dataclasses.replace(cfg, eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
        if cfg.head_dim is None:
            check_heads(cfg.hidden_size, cfg.num_attention_heads)
        if cfg.num_attention_heads % cfg.kv_heads:
            raise UserError(f"num_attention_heads {cfg.num_attention_heads} is not divisible by "
                            f"num_key_value_heads {cfg.kv_heads}")
        if cfg.dim % 2:
            raise UserError(f"the head width {cfg.dim} must be even for rotary positions")
        return cfg


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2] (float32, as HF computes them)."""
    d = cfg.dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv = inv.astype(np.float32)
    if cfg.rope_type == "linear":
        return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type != "llama3":
        return inv
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate(x, positions, inv_freq):
    """Rotary positions on x [B, L, H, Dh] at int positions [B, L] (HF's rotate_half), in float32."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)


# ---- the decoder-LM machinery the families share ------------------------------------------

def causal_bias(query_slots, key_valid):
    """[B, 1, L, S] additive bias: a query at slot q sees the valid keys at slots <= q.

    Args:
      query_slots: int [L], the queries' slots.
      key_valid: bool [B, S], which key slots hold real tokens.
    """
    s = key_valid.shape[-1]
    allowed = (jnp.arange(s)[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
    return jnp.where(allowed, 0.0, NEG).astype(jnp.float32)[:, None]


def extend_kv(k, v, *, prefix=None, cache=None, slot=None):
    """The keys/values a layer attends to, [B, S, kv_heads, Dh].

    With `cache` ({"key", "value"}): k, v written at `slot` (a traced int), the whole cache
    returned with its update. Else the prefix (two [P, kv_heads, Dh], every row's) then k, v.

    Returns:
      (keys, values, the updated cache or None).
    """
    if cache is not None:
        at = (0, slot, 0, 0)
        k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), at)
        v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), at)
        return k, v, {"key": k, "value": v}
    if prefix is not None:
        pk, pv = (jnp.broadcast_to(t.astype(k.dtype), (k.shape[0], *t.shape)) for t in prefix)
        k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
    return k, v, None


def attend(q, k, v, bias, scale: float, drop: Callable, dtype):
    """Grouped-query attention: q [B, L, H, Dh] over k, v [B, S, Hkv, Dh] -> [B, L, H * Dh].

    Query head h reads key/value head h // (H / Hkv), as HF's repeat_kv. The scores and
    softmax are float32; `bias` [B, 1, L, S] is additive; `drop` drops out the probabilities.
    """
    b, length, heads, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, length, kv, heads // kv, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k.astype(q.dtype)).astype(jnp.float32) * scale
    probs = drop(jax.nn.softmax(scores + bias[:, :, None], axis=-1)).astype(dtype)
    return jnp.einsum("bkgls,bskd->blkgd", probs, v.astype(dtype)).reshape(b, length, heads * d)


@dataclasses.dataclass(frozen=True)
class _PrefixShape:
    """What layers.PrefixEncoder reads: per-layer key/value prefixes of width kv_heads * head_dim."""

    num_hidden_layers: int
    hidden_size: int
    initializer_range: float


def check_lora_targets(module: DecoderLM, denses: list[str]) -> None:
    """One clear line when LoRA is on and its regex names none of the model's projections.

    Args:
      module: the model (its path prefixes the Dense paths, as the Dense layers see them).
      denses: the Dense module paths below `module` ("layer_0/self_attn/q_proj", ...).
    """
    p = module.peft
    if not p.lora_rank:
        return
    paths = ["/".join((*module.path, d)) for d in denses]
    if not any(re.fullmatch(p.lora_targets, path) for path in paths):
        raise UserError(f"method_args.lora_targets={p.lora_targets!r} matches none of the {module.family_name} "
                        f"projections (module paths like {paths[0]!r}): set it to e.g. "
                        f"{module.recommended_lora_targets!r}")


class DecoderLM(nn.Module):
    """A decoder-only LM: the flow shared by the families (see the module docstring).

    A subclass's setup() makes `self.layers` (each layer(x, positions, bias, train=, prefix=,
    cache=, slot=) -> (x, layer cache or None)) and calls `self.setup_peft(width)`; it
    defines `embed(ids)`, `inputs(x, positions, train)` (position embeddings, dropout),
    `final(x)` (the last norm), `logits(h)`, and the class attributes below.

    Attributes:
      config: the family's config dataclass.
      dtype: compute dtype (parameters stay float32).
      dropout_override: replaces the config's hidden dropout when set.
      peft: LoRA, IA3, adapters, soft prompts and prefixes.
    """

    config: Any
    dtype: Any = jnp.float32
    dropout_override: float | None = None
    peft: Peft = Peft()
    # Class attributes (not dataclass fields); a subclass also defines the properties
    # max_positions, kv_heads, head_dim and window (a sliding window it refuses to pass, or None).
    family_name = "decoder"
    recommended_lora_targets = RECOMMENDED_LORA_TARGETS

    def setup_peft(self, width: int) -> None:
        """The soft prompt ("prompt" [P, width]) and the prefix encoder ("prefix"), when the method adds them."""
        p, cfg = self.peft, self.config
        if p.prompt_tokens:
            self.prompt = self.param("prompt", nn.initializers.normal(cfg.initializer_range),
                                     (p.prompt_tokens, width), jnp.float32)
        if p.prefix_tokens:
            shape = _PrefixShape(len(self.layers), self.kv_heads * self.head_dim, cfg.initializer_range)
            self.prefix = PrefixEncoder(shape, p)

    def _check_length(self, length: int, what: str) -> None:
        if length > self.max_positions:
            extra = self.peft.prefix_tokens + self.peft.prompt_tokens
            raise UserError(f"{what} {length}{f' (with {extra} prompt/prefix slots)' if extra else ''} exceeds the "
                            f"model's {self.max_positions} positions: shorten the input or generation")
        if self.window is not None and length > self.window:
            raise UserError(f"{what} {length} exceeds the model's sliding_window {self.window}, which ftjax does "
                            "not implement: shorten the input or generation")

    def _prefixes(self) -> list:
        n = self.peft.prefix_tokens
        if not n:
            return [None] * len(self.layers)
        shape = (n, self.kv_heads, self.head_dim)
        return [(k.reshape(shape), v.reshape(shape)) for k, v in self.prefix()]

    def _run(self, x, positions, bias, train: bool, prefixes=None, cache=None, slot=None):
        new = {}
        for i, layer in enumerate(self.layers):
            c = None if cache is None else cache[f"layer_{i}"]
            x, c = layer(x, positions, bias, train=train, prefix=None if prefixes is None else prefixes[i],
                         cache=c, slot=slot)
            if c is not None:
                new[f"layer_{i}"] = c
        return x, new

    def _soft_prompt(self, rows: int):
        return jnp.broadcast_to(self.prompt.astype(self.dtype), (rows, *self.prompt.shape))

    def hidden(self, input_ids, attention_mask, *, train: bool = False):
        """The final normed hidden states [B, T, D] of input_ids [B, T] (attention_mask 1 for real tokens)."""
        p1, p2 = self.peft.prefix_tokens, self.peft.prompt_tokens
        b, t = input_ids.shape
        self._check_length(p1 + p2 + t, "sequence length")
        mask = attention_mask > 0
        x = self.embed(input_ids)
        positions = p1 + p2 + jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
        if p2:
            x = jnp.concatenate([self._soft_prompt(b), x.astype(self.dtype)], 1)
            mask = jnp.concatenate([jnp.ones((b, p2), bool), mask], 1)
            positions = jnp.concatenate([jnp.broadcast_to(p1 + jnp.arange(p2), (b, p2)), positions], 1)
        x = self.inputs(x, positions, train)
        bias = causal_bias(p1 + jnp.arange(p2 + t), jnp.concatenate([jnp.ones((b, p1), bool), mask], 1))
        x, _ = self._run(x, positions, bias, train, prefixes=self._prefixes())
        return self.final(x[:, p2:])

    def __call__(self, input_ids, attention_mask, *, train: bool = False):
        """Logits f32 [B, T, V] of input_ids [B, T]: causal, padding masked, positions from the mask."""
        return self.logits(self.hidden(input_ids, attention_mask, train=train))

    def init_cache(self, prompt_mask, max_length: int) -> dict[str, Any]:
        """The decoding cache for prompts with mask [N, n] and `max_length` (>= n) text positions.

        Prefix keys/values and the soft prompt's keys/values (run through the layers here) fill
        the first E slots. See the module docstring for the layout.
        """
        p1, p2 = self.peft.prefix_tokens, self.peft.prompt_tokens
        e = p1 + p2
        rows, n = prompt_mask.shape
        if n > max_length:
            raise UserError(f"the prompt ({n} tokens) is longer than the cache's max_length {max_length}")
        self._check_length(e + max_length, "prompt + generated tokens")
        prompt_mask = prompt_mask > 0
        mask = jnp.concatenate([jnp.ones((rows, e), bool), prompt_mask, jnp.ones((rows, max_length - n), bool)], 1)
        shape = (rows, e + max_length, self.kv_heads, self.head_dim)
        cache: dict[str, Any] = {f"layer_{i}": {"key": jnp.zeros(shape, self.dtype),
                                                "value": jnp.zeros(shape, self.dtype)} for i in range(len(self.layers))}
        if p1:
            for i, (k, v) in enumerate(self._prefixes()):
                _, _, cache[f"layer_{i}"] = extend_kv(jnp.broadcast_to(k, (rows, *k.shape)),
                                                      jnp.broadcast_to(v, (rows, *v.shape)),
                                                      cache=cache[f"layer_{i}"], slot=0)
        if p2:
            positions = jnp.broadcast_to(p1 + jnp.arange(p2), (rows, p2))
            x = self.inputs(self._soft_prompt(rows), positions, False)
            _, layers = self._run(x, positions, causal_bias(p1 + jnp.arange(p2), mask), False, cache=cache, slot=p1)
            cache.update(layers)
        cache["mask"] = mask
        cache["offset"] = jnp.argmax(prompt_mask, axis=1).astype(jnp.int32)
        return cache

    def decode_step(self, token_ids, cache, index, *, train: bool = False):
        """Feeds token_ids [N, n] at text positions index..index+n-1 (prefill: the prompt at 0).

        jit-able with a traced `index`; index + n must not pass the cache's max_length
        (dynamic_update_slice would clamp it).

        Returns:
          (logits f32 [N, n, V], the updated cache).
        """
        e = self.peft.prefix_tokens + self.peft.prompt_tokens
        n = token_ids.shape[1]
        mask = cache["mask"]
        if e + n > mask.shape[1]:
            raise UserError(f"{n} tokens do not fit the cache's {mask.shape[1] - e} positions")
        slot = e + jnp.asarray(index, jnp.int32)
        slots = slot + jnp.arange(n)
        positions = jnp.maximum(slots[None, :] - cache["offset"][:, None], e)
        x = self.inputs(self.embed(token_ids), positions, train)
        layers = {k: v for k, v in cache.items() if k.startswith("layer_")}
        x, layers = self._run(x, positions, causal_bias(slots, mask), train, cache=layers, slot=slot)
        return self.logits(self.final(x)), {**cache, **layers}


# ---- Llama ----------------------------------------------------------------------------------

class Linear(nn.Module):
    """A Dense (params "kernel" [in, out], "bias" when use_bias) with layers.Dense's LoRA branch."""

    features: int
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        p = self.peft
        if p.lora_rank and re.fullmatch(p.lora_targets, "/".join(self.path)):
            a = self.param("lora_a", nn.initializers.kaiming_uniform(), (x.shape[-1], p.lora_rank), jnp.float32)
            b = self.param("lora_b", nn.initializers.zeros, (p.lora_rank, self.features), jnp.float32)
            h = Dropout(p.lora_dropout, deterministic=not train)(x)
            y = y + (h @ a.astype(self.dtype)) @ b.astype(self.dtype) * (p.lora_alpha / p.lora_rank)
        return y


class RMSNorm(nn.Module):
    """x / rms(x) * scale, the statistics in float32 (HF's LlamaRMSNorm)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def _linear(cfg: LlamaConfig, features: int, bias: bool, dtype, peft: Peft) -> Linear:
    return Linear(features, bias, nn.initializers.normal(cfg.initializer_range), dtype, peft)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions, IA3 on keys and values, prefixes and the cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def setup(self):
        cfg, peft = self.config, self.peft
        heads, kv, d = cfg.num_attention_heads, cfg.kv_heads, cfg.dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = _linear(cfg, heads * d, qkv_bias, self.dtype, peft)
        self.k_proj = _linear(cfg, kv * d, qkv_bias, self.dtype, peft)
        self.v_proj = _linear(cfg, kv * d, qkv_bias, self.dtype, peft)
        self.o_proj = _linear(cfg, cfg.hidden_size, cfg.attention_bias, self.dtype, peft)
        if peft.ia3:
            self.ia3_key = self.param("ia3_key", nn.initializers.ones, (kv * d,), jnp.float32)
            self.ia3_value = self.param("ia3_value", nn.initializers.ones, (kv * d,), jnp.float32)
        self.drop = Dropout(cfg.attention_dropout)

    def __call__(self, x, positions, bias, *, train: bool = False, prefix=None, cache=None, slot=None):
        cfg = self.config
        split = lambda t: t.reshape(*t.shape[:-1], -1, cfg.dim)  # noqa: E731
        q, k, v = self.q_proj(x, train=train), self.k_proj(x, train=train), self.v_proj(x, train=train)
        if self.peft.ia3:
            k, v = k * self.ia3_key.astype(k.dtype), v * self.ia3_value.astype(v.dtype)
        inv_freq = rope_frequencies(cfg)
        q, k, v = rotate(split(q), positions, inv_freq), rotate(split(k), positions, inv_freq), split(v)
        k, v, cache = extend_kv(k, v, prefix=prefix, cache=cache, slot=slot)
        ctx = attend(q, k, v, bias, cfg.dim ** -0.5, lambda p: self.drop(p, deterministic=not train), self.dtype)
        return self.o_proj(ctx, train=train), cache


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)), IA3 ("ia3_ffn") scaling the product."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        cfg, peft = self.config, self.peft
        dense = lambda f, name: Linear(f, cfg.mlp_bias, nn.initializers.normal(cfg.initializer_range),  # noqa: E731
                                       self.dtype, peft, name=name)
        h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "gate_proj")(x, train=train))
        h = h * dense(cfg.intermediate_size, "up_proj")(x, train=train)
        if peft.ia3:
            h = h * self.param("ia3_ffn", nn.initializers.ones, (cfg.intermediate_size,), jnp.float32).astype(h.dtype)
        return dense(cfg.hidden_size, "down_proj")(h, train=train)


class LlamaLayer(nn.Module):
    """RMSNorm -> attention -> [adapter] -> residual; RMSNorm -> MLP -> [adapter] -> residual."""

    config: LlamaConfig
    dropout: float = 0.0
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def setup(self):
        cfg, peft, dtype = self.config, self.peft, self.dtype
        self.input_layernorm = RMSNorm(cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, peft)
        self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(cfg, dtype, peft)
        if peft.adapter == "houlsby":
            self.attention_adapter = Adapter(peft.adapter_size, peft.adapter_init_std, dtype)
        if peft.adapter in ("houlsby", "pfeiffer"):
            self.mlp_adapter = Adapter(peft.adapter_size, peft.adapter_init_std, dtype)
        self.drop = Dropout(self.dropout)

    def __call__(self, x, positions, bias, *, train: bool = False, prefix=None, cache=None, slot=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, bias, train=train, prefix=prefix, cache=cache,
                                  slot=slot)
        if self.peft.adapter == "houlsby":
            h = self.attention_adapter(h)
        x = x + self.drop(h, deterministic=not train)
        h = self.mlp(self.post_attention_layernorm(x), train=train)
        if self.peft.adapter in ("houlsby", "pfeiffer"):
            h = self.mlp_adapter(h)
        return x + self.drop(h, deterministic=not train), cache


class Llama(DecoderLM):
    """LlamaForCausalLM (also Mistral within its sliding window, and Qwen2); see the module docstring."""

    family_name = "llama"

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def kv_heads(self) -> int:
        return self.config.kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.dim

    @property
    def window(self) -> int | None:
        return self.config.sliding_window

    def setup(self):
        cfg, peft, dtype = self.config, self.peft, self.dtype
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                        embedding_init=nn.initializers.normal(cfg.initializer_range))
        dropout = self.dropout_override or 0.0  # HF's Llama has no hidden dropout
        self.layers = [LlamaLayer(cfg, dropout, dtype, peft, name=f"layer_{i}") for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.vocab_size, False, dtype, peft)
        self.setup_peft(cfg.hidden_size)
        names = [f"layer_{i}/{m}" for i in range(cfg.num_hidden_layers)
                 for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")]
        check_lora_targets(self, names + ([] if cfg.tie_word_embeddings else ["lm_head"]))

    def embed(self, ids):
        return self.word_embeddings(ids)

    def inputs(self, x, positions, train: bool):
        del positions, train  # rotary positions act in the attention
        return x

    def final(self, x):
        return self.norm(x)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.word_embeddings.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)


# ---- the FamilySpec pieces ------------------------------------------------------------------

def lm_layout(layer_count: int, norms: str, top: tuple[str, ...]) -> Layout:
    """Depth groups of a decoder LM: the embeddings, the layers, the final norm and untied head."""
    return Layout(groups=(r".*/(word|position)_embeddings/.*",) + tuple(rf".*/layer_{i}/.*" for i in range(layer_count)),
                  top=top + (r".*/lm_head/.*",), norms=norms)


def layout(config: LlamaConfig) -> Layout:
    return lm_layout(config.num_hidden_layers, r".*/(input_layernorm|post_attention_layernorm|norm)/scale",
                     (r".*/norm/.*",))


def tied_head_load(family: str) -> Callable[[dict, dict], dict]:
    """FamilySpec.load: a tied model drops a checkpoint's lm_head equal to its embeddings (refuses another)."""
    def load(loaded: dict, fresh: dict) -> dict:
        params = loaded.get("params", {}).get(family, {})
        if "lm_head" not in params or "lm_head" in fresh.get("params", {}).get(family, {}):
            return loaded
        head = np.asarray(params["lm_head"]["kernel"])
        table = np.asarray(params.get("word_embeddings", {}).get("embedding", np.zeros((0, 0))))
        if head.shape != table.T.shape or not np.array_equal(head, table.T):
            raise UserError("the checkpoint's lm_head differs from its token embeddings, but its config ties them "
                            "(tie_word_embeddings): set tie_word_embeddings=false in config.json to load it")
        kept = {k: v for k, v in params.items() if k != "lm_head"}
        return {**loaded, "params": {**loaded["params"], family: kept}}
    return load


def lm_export(architecture: str, model_type: str) -> HFExport:
    """The HF export of a causal LM: refuses classifier runs and configs of another model_type."""
    def check(meta: dict) -> None:
        if meta.get("task") in ("classification", "regression"):
            raise UserError(f"a {meta['task']} run has no {architecture} export: that class is a language model")
        found = meta.get("model_config", {}).get("model_type", model_type)
        if found != model_type:
            raise UserError(f"a {found} model cannot be exported as {architecture} (model_type {model_type})")
    return HFExport(architecture, model_type, check)


def _model(cfg: LlamaConfig, opts: EncoderOptions, name: str) -> Llama:
    return Llama(cfg, dtype=opts.dtype, dropout_override=opts.dropout, peft=opts.peft, name=name)


FAMILY = FamilySpec(
    name="llama", model_types=("llama", "mistral", "qwen2"), modality="text", config_class=LlamaConfig,
    encoder=_model, layout=layout, converter="ftjax.convert.llama",
    variants={"tiny": TINY_LLAMA, "smollm2-135m": SMOLLM2_135M}, provides=("attention", "causal_lm"),
    load=tied_head_load("llama"), hf_export=lm_export("LlamaForCausalLM", "llama"))
