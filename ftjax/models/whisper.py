"""Whisper (Radford et al. 2022) in Flax Linen, HF WhisperForConditionalGeneration semantics.

An audio encoder (two Conv1d + GELU, the fixed position table, pre-LN layers, a final
LayerNorm) and a text decoder (token + learned position embeddings, pre-LN layers with
causal self-attention and cross-attention, a final LayerNorm, the output projection tied
to the token embeddings).

Parameter paths (the speech task creates the model under "whisper"):
  whisper/encoder/conv{1,2}/{kernel [3, C_in, D], bias}
  whisper/encoder/layer_{i}/{attention,mlp}_LayerNorm/{scale,bias}
  whisper/encoder/layer_{i}/attention/{query,key,value,out}/{kernel,bias}   (2-D kernels)
  whisper/encoder/layer_{i}/mlp/{fc1,fc2}/{kernel,bias}
  whisper/encoder/LayerNorm/{scale,bias}
  whisper/decoder/embed_tokens/embedding [V, D], whisper/decoder/positions [max_target_positions, D]
  whisper/decoder/layer_{i}/{attention,cross_attention,mlp}_LayerNorm/{scale,bias}
  whisper/decoder/layer_{i}/{attention,cross_attention}/{query,key,value,out}/{kernel,bias}
  whisper/decoder/layer_{i}/mlp/{fc1,fc2}/{kernel,bias}
  whisper/decoder/LayerNorm/{scale,bias}
The encoder's position table is no parameter: it sits in the non-trainable "constants"
collection, constants/whisper/encoder/positions [max_source_positions, D], initialised to
the float32 sinusoid and loaded from the checkpoint (CTranslate2 files store it rounded to
float16, and CTranslate2 adds the rounded table: loading it reproduces CTranslate2's
encoder). The trainer carries it as model state, never optimised.
With a fine-tuning method's additions: .../attention/{query,value}/lora_{a,b} (LoRA's
default targets: self-attention in both stacks), .../attention/ia3_{key,value} (IA3 on
self-attention keys and values), layer_{i}/{attention,mlp}_adapter/{down,up}/...
HF's k_proj has no bias; "key/bias" loads as zeros and the export drops it, which
changes nothing: a bias on the keys adds the same score to every key of a query.

Decoding keeps a functional cache: `init_cache` -> per decoder layer the self-attention
keys/values (zeros, filled by `decode_step`) and the cross-attention keys/values of the
encoder output, every array with the batch on axis 0.
"""

from __future__ import annotations

import dataclasses
import math
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
    Dense,
    Peft,
    check_heads,
    config_from_hf,
)
from ftjax.models.layout import Layout

LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which HF Whisper uses
CONSTANTS = "constants"  # the collection of fixed (never trained) tables: the encoder's positions
NEG = -1e9  # additive attention bias of a masked key (float32, so bf16 cannot overflow it)

# Token ids of the multilingual and the English-only tokenizers.
_MULTILINGUAL = {"vocab_size": 51865, "decoder_start_token_id": 50258, "eos_token_id": 50257,
                 "pad_token_id": 50257, "bos_token_id": 50257}
_ENGLISH = {"vocab_size": 51864, "decoder_start_token_id": 50257, "eos_token_id": 50256,
            "pad_token_id": 50256, "bos_token_id": 50256}


def _variant(d_model: int, layers: int, heads: int, tokens: dict[str, int]) -> dict[str, Any]:
    return {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "d_model": d_model,
            "encoder_layers": layers, "decoder_layers": layers, "encoder_attention_heads": heads,
            "decoder_attention_heads": heads, "encoder_ffn_dim": 4 * d_model, "decoder_ffn_dim": 4 * d_model,
            "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 448,
            "activation_function": "gelu", "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
            "activation_dropout": 0.0, **tokens}


# "tiny": small random shapes for tests (the real vocabulary, so the real tokenizer fits it).
TINY_WHISPER = {**_variant(64, 2, 2, _MULTILINGUAL), "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
VARIANTS = {
    "tiny": TINY_WHISPER,
    "tiny_multilingual": _variant(384, 4, 6, _MULTILINGUAL), "tiny.en": _variant(384, 4, 6, _ENGLISH),
    "base": _variant(512, 6, 8, _MULTILINGUAL), "base.en": _variant(512, 6, 8, _ENGLISH),
    "small": _variant(768, 12, 12, _MULTILINGUAL), "small.en": _variant(768, 12, 12, _ENGLISH),
}


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The HF WhisperConfig fields ftjax uses (same names)."""

    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    max_target_positions: int = 448
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    scale_embedding: bool = False
    decoder_start_token_id: int = 50257
    eos_token_id: int = 50256
    pad_token_id: int = 50256
    bos_token_id: int = 50256
    init_std: float = 0.02

    @property
    def initializer_range(self) -> float:
        """HF Whisper calls its init std `init_std`."""
        return self.init_std

    @property
    def layer_norm_eps(self) -> float:
        return LAYER_NORM_EPS

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> WhisperConfig:
        """Builds the config from a config.json dict, ignoring unrelated keys."""
        cfg = config_from_hf(cls, hf)
        if cfg.activation_function not in ACTIVATIONS:
            raise UserError(f"activation_function={cfg.activation_function!r} is not supported "
                            f"({', '.join(ACTIVATIONS)})")
        check_heads(cfg.d_model, cfg.encoder_attention_heads, "d_model", "encoder_attention_heads")
        check_heads(cfg.d_model, cfg.decoder_attention_heads, "d_model", "decoder_attention_heads")
        if cfg.d_model < 4 or cfg.d_model % 2:
            raise UserError(f"d_model {cfg.d_model} must be even and >= 4 (the encoder's sinusoid)")
        return cfg


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's fixed encoder positions [length, channels]: sin | cos over geometric timescales.

    Computed in float32 as the reference does (float64 differs by up to 2e-4 at 1500 positions).
    """
    half = channels // 2
    inv_timescales = np.exp(np.float32(-math.log(10000.0) / (half - 1)) * np.arange(half, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def _layer_norm(dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Multi-head attention whose keys/values come in separately (`kv`), for caching.

    Attributes:
      features: the model width D.
      heads: the number of heads.
      attention_dropout: dropout on the attention probabilities.
      init_std: the projections' normal init std.
      dtype: compute dtype (parameters stay float32).
      peft: LoRA reaches the projections through Dense.
      ia3: learned scales on the keys and values ("ia3_key", "ia3_value").
    """

    features: int
    heads: int
    attention_dropout: float
    init_std: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    ia3: bool = False

    def setup(self):
        dense = lambda: Dense(self.features, kernel_init=nn.initializers.normal(self.init_std),  # noqa: E731
                              dtype=self.dtype, peft=self.peft)
        self.query, self.key, self.value, self.out = dense(), dense(), dense(), dense()
        if self.ia3:
            self.ia3_key = self.param("ia3_key", nn.initializers.ones, (self.features,), jnp.float32)
            self.ia3_value = self.param("ia3_value", nn.initializers.ones, (self.features,), jnp.float32)
        self.drop = Dropout(self.attention_dropout)

    def _split(self, t):
        return t.reshape(*t.shape[:-1], self.heads, self.features // self.heads)

    def kv(self, source, *, train: bool = False):
        """The keys and values of `source` [B, S, D] -> two [B, S, H, Dh]."""
        k, v = self.key(source, train=train), self.value(source, train=train)
        if self.ia3:
            k, v = k * self.ia3_key.astype(k.dtype), v * self.ia3_value.astype(v.dtype)
        return self._split(k), self._split(v)

    def __call__(self, x, k, v, bias, *, train: bool = False):
        """Attends from `x` [B, L, D] to keys/values [B, S, H, Dh]; `bias` [.., L, S] additive or None."""
        q = self._split(self.query(x, train=train))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(self.features // self.heads)
        probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
        probs = self.drop(probs, deterministic=not train).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(self.dtype)).reshape(*x.shape[:-1], self.features)
        return self.out(ctx, train=train)


class Mlp(nn.Module):
    """fc1 -> activation -> activation dropout -> fc2."""

    ffn: int
    features: int
    activation: str
    activation_dropout: float
    init_std: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        init = nn.initializers.normal(self.init_std)
        h = Dense(self.ffn, kernel_init=init, dtype=self.dtype, peft=self.peft, name="fc1")(x, train=train)
        h = Dropout(self.activation_dropout, deterministic=not train)(ACTIVATIONS[self.activation](h))
        return Dense(self.features, kernel_init=init, dtype=self.dtype, peft=self.peft, name="fc2")(h, train=train)


class Layer(nn.Module):
    """A pre-LN layer: self-attention, [cross-attention], MLP, each a residual branch.

    Attributes:
      config: the WhisperConfig.
      heads: attention heads of this stack.
      ffn: MLP width of this stack.
      dropout: the hidden (residual branch) dropout.
      cross: a decoder layer (causal self-attention + cross-attention).
      dtype: compute dtype.
      peft: LoRA, IA3 (self-attention) and adapters ("attention_adapter", "mlp_adapter").
    """

    config: WhisperConfig
    heads: int
    ffn: int
    dropout: float
    cross: bool = False
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def setup(self):
        cfg, peft, dtype = self.config, self.peft, self.dtype
        attention = lambda ia3: Attention(cfg.d_model, self.heads, cfg.attention_dropout, cfg.init_std,  # noqa: E731
                                          dtype, peft, ia3)
        self.attention_LayerNorm, self.attention = _layer_norm(dtype), attention(peft.ia3)
        if self.cross:
            self.cross_attention_LayerNorm, self.cross_attention = _layer_norm(dtype), attention(False)
        self.mlp_LayerNorm = _layer_norm(dtype)
        self.mlp = Mlp(self.ffn, cfg.d_model, cfg.activation_function, cfg.activation_dropout, cfg.init_std,
                       dtype, peft)
        if peft.adapter == "houlsby":
            self.attention_adapter = Adapter(peft.adapter_size, peft.adapter_init_std, dtype)
        if peft.adapter in ("houlsby", "pfeiffer"):
            self.mlp_adapter = Adapter(peft.adapter_size, peft.adapter_init_std, dtype)
        self.drop = Dropout(self.dropout)

    def cross_kv(self, encoder_out):
        """The cross-attention keys/values of the encoder output (two [B, P, H, Dh])."""
        return self.cross_attention.kv(encoder_out)

    def __call__(self, x, bias, *, train: bool = False, cross=None, cache=None, index=None):
        """One layer.

        Args:
          x: [B, L, D].
          bias: the self-attention's additive bias [1, 1, L, S] (causal), or None.
          train: dropout on.
          cross: decoder: the cross-attention (keys, values).
          cache: decoder step: {"key", "value"} [B, S, H, Dh] the new keys/values go into at `index`.
          index: where the L tokens sit in `cache`.

        Returns:
          (the layer output [B, L, D], the updated cache or None).
        """
        h = self.attention_LayerNorm(x)
        k, v = self.attention.kv(h, train=train)
        if cache is not None:
            at = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), at)
            cache = {**cache, "key": k, "value": v}
        h = self.attention(h, k, v, bias, train=train)
        if self.peft.adapter == "houlsby":
            h = self.attention_adapter(h)
        x = x + self.drop(h, deterministic=not train)
        if self.cross:
            h = self.cross_attention(self.cross_attention_LayerNorm(x), *cross, None, train=train)
            x = x + self.drop(h, deterministic=not train)
        h = self.mlp(self.mlp_LayerNorm(x), train=train)
        if self.peft.adapter in ("houlsby", "pfeiffer"):
            h = self.mlp_adapter(h)
        return x + self.drop(h, deterministic=not train), cache


class Encoder(nn.Module):
    """Log-mel frames [B, n_mels, 2P] -> [B, P, D]."""

    config: WhisperConfig
    dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def _positions(self) -> jax.Array:
        """The position table [max_source_positions, D] of the "constants" collection."""
        cfg = self.config
        if not self.has_variable(CONSTANTS, "positions") and not self.is_mutable_collection(CONSTANTS):
            raise UserError(f"the variables have no {CONSTANTS!r} collection (the encoder's position table): "
                            "apply the model to {'params': ..., **model_state}, not to the params alone")
        table = self.variable(CONSTANTS, "positions",
                              lambda: jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model)))
        return table.value

    @nn.compact
    def __call__(self, input_features, *, train: bool = False):
        cfg = self.config
        if input_features.ndim != 3 or input_features.shape[1] != cfg.num_mel_bins:
            raise UserError(f"input_features of shape {tuple(input_features.shape)}: the encoder takes "
                            f"[batch, {cfg.num_mel_bins} mel bins, frames]")
        frames = input_features.shape[2]
        positions = (frames + 1) // 2
        if positions > cfg.max_source_positions:
            raise UserError(f"{frames} mel frames exceed the encoder's {2 * cfg.max_source_positions} "
                            f"(max_source_positions {cfg.max_source_positions}): cut the audio to "
                            f"{cfg.max_source_positions / 50:g} s")
        conv = lambda name, stride: nn.Conv(cfg.d_model, (3,), strides=(stride,), padding=((1, 1),),  # noqa: E731
                                            dtype=self.dtype, param_dtype=jnp.float32, name=name)
        gelu = ACTIVATIONS["gelu"]
        x = jnp.swapaxes(input_features, 1, 2).astype(self.dtype)  # [B, frames, n_mels]
        x = gelu(conv("conv2", 2)(gelu(conv("conv1", 1)(x))))
        x = x + self._positions()[:positions].astype(self.dtype)
        x = Dropout(self.dropout, deterministic=not train)(x)
        for i in range(cfg.encoder_layers):
            x, _ = Layer(cfg, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, self.dropout, False, self.dtype,
                         self.peft, name=f"layer_{i}")(x, None, train=train)
        return _layer_norm(self.dtype, "LayerNorm")(x)


class Decoder(nn.Module):
    """Token ids + encoder output -> logits over the vocabulary (tied output projection)."""

    config: WhisperConfig
    dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.init_std)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, dtype=self.dtype,
                                     param_dtype=jnp.float32)
        self.positions = self.param("positions", init, (cfg.max_target_positions, cfg.d_model), jnp.float32)
        self.layers = [Layer(cfg, cfg.decoder_attention_heads, cfg.decoder_ffn_dim, self.dropout, True, self.dtype,
                             self.peft, name=f"layer_{i}") for i in range(cfg.decoder_layers)]
        self.LayerNorm = _layer_norm(self.dtype)
        self.drop = Dropout(self.dropout)

    def _embed(self, ids, start, train: bool):
        cfg = self.config
        x = self.embed_tokens(ids)
        if cfg.scale_embedding:
            x = x * math.sqrt(cfg.d_model)
        pos = jax.lax.dynamic_slice_in_dim(self.positions, start, ids.shape[1], axis=0)
        return self.drop(x + pos.astype(x.dtype), deterministic=not train)

    def _logits(self, x):
        return self.embed_tokens.attend(self.LayerNorm(x)).astype(jnp.float32)

    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.max_target_positions:
            raise UserError(f"{what} {length} exceeds the decoder's max_target_positions "
                            f"{self.config.max_target_positions}")

    def __call__(self, decoder_input_ids, encoder_out, *, train: bool = False):
        length = decoder_input_ids.shape[1]
        self._check_length(length, "decoder sequence length")
        x = self._embed(decoder_input_ids, 0, train)
        pos = jnp.arange(length)
        bias = jnp.where(pos[None, :] <= pos[:, None], 0.0, NEG).astype(jnp.float32)[None, None]
        for layer in self.layers:
            x, _ = layer(x, bias, train=train, cross=layer.cross_kv(encoder_out))
        return self._logits(x)

    def init_cache(self, encoder_out, max_length: int) -> dict[str, dict[str, jax.Array]]:
        self._check_length(max_length, "cache length")
        cfg = self.config
        heads = cfg.decoder_attention_heads
        shape = (encoder_out.shape[0], max_length, heads, cfg.d_model // heads)
        cache = {}
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_kv(encoder_out)
            cache[f"layer_{i}"] = {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype),
                                   "cross_key": k.astype(self.dtype), "cross_value": v.astype(self.dtype)}
        return cache

    def decode_step(self, token_ids, cache, index, *, train: bool = False):
        n = token_ids.shape[1]
        length = cache["layer_0"]["key"].shape[1]
        index = jnp.asarray(index, jnp.int32)
        x = self._embed(token_ids, index, train)
        query_pos = index + jnp.arange(n)
        bias = jnp.where(jnp.arange(length)[None, :] <= query_pos[:, None], 0.0, NEG).astype(jnp.float32)
        new = {}
        for i, layer in enumerate(self.layers):
            c = cache[f"layer_{i}"]
            x, new[f"layer_{i}"] = layer(x, bias[None, None], train=train, cross=(c["cross_key"], c["cross_value"]),
                                         cache=c, index=index)
        return self._logits(x), new


class Whisper(nn.Module):
    """Whisper encoder-decoder; reach the methods with `model.apply(variables, ..., method=...)`.

    Attributes:
      config: the WhisperConfig.
      dtype: compute dtype (parameters stay float32).
      dropout_override: replaces the config's `dropout` (hidden) when set.
      peft: LoRA, IA3 and adapters; prompts and prefixes are refused.
    """

    config: WhisperConfig
    dtype: Any = jnp.float32
    dropout_override: float | None = None
    peft: Peft = Peft()

    def setup(self):
        if self.peft.prompt_tokens or self.peft.prefix_tokens:
            raise UserError("Whisper takes no soft prompts or prefixes: use lora, ia3, adapter or a "
                            "freezing method")
        cfg = self.config
        dropout = cfg.dropout if self.dropout_override is None else self.dropout_override
        self.encoder = Encoder(cfg, dropout, self.dtype, self.peft)
        self.decoder = Decoder(cfg, dropout, self.dtype, self.peft)

    def __call__(self, input_features, decoder_input_ids, *, train: bool = False):
        """Teacher-forced logits f32 [B, L, V] of `decoder_input_ids` [B, L] given log-mels [B, n_mels, 2P]."""
        return self.decoder(decoder_input_ids, self.encoder(input_features, train=train), train=train)

    def encode(self, input_features, *, train: bool = False):
        """Log-mels [B, n_mels, 2P] -> the encoder output [B, P, D] (UserError if P > max_source_positions)."""
        return self.encoder(input_features, train=train)

    def decode(self, decoder_input_ids, encoder_out, *, train: bool = False):
        """Teacher-forced (causal) logits f32 [B, L, V] given the encoder output [B, P, D]."""
        return self.decoder(decoder_input_ids, encoder_out, train=train)

    def init_cache(self, encoder_out, max_length: int):
        """The decoding cache for `max_length` positions.

        Returns:
          {"layer_<i>": {"key", "value": zeros [B, max_length, H, Dh],
                         "cross_key", "cross_value": [B, P, H, Dh]}} (compute dtype).
        """
        return self.decoder.init_cache(encoder_out, max_length)

    def decode_step(self, token_ids, cache, index, *, train: bool = False):
        """Feeds `token_ids` [B, n] at positions index..index+n-1 (causal among themselves).

        They attend to the cache's positions [0, index + n); jit-able with a traced `index`.
        index + n must not exceed the cache length (dynamic_update_slice would clamp it).

        Returns:
          (logits f32 [B, n, V], the updated cache).
        """
        return self.decoder.decode_step(token_ids, cache, index, train=train)


def layout(config: WhisperConfig) -> Layout:
    """Depth groups: the stem (convs, token and position embeddings), encoder layers, decoder layers."""
    return Layout(groups=(r".*/encoder/conv[12]/.*|.*/decoder/(embed_tokens/.*|positions)",)
                  + tuple(rf".*/encoder/layer_{i}/.*" for i in range(config.encoder_layers))
                  + tuple(rf".*/decoder/layer_{i}/.*" for i in range(config.decoder_layers)),
                  top=(r".*/encoder/LayerNorm/.*", r".*/decoder/LayerNorm/.*"), norms=r".*LayerNorm.*")


def _model(cfg: WhisperConfig, opts: EncoderOptions, name: str) -> Whisper:
    return Whisper(cfg, dtype=opts.dtype, dropout_override=opts.dropout, peft=opts.peft, name=name)


FAMILY = FamilySpec(
    name="whisper", model_types=("whisper",), modality="audio", config_class=WhisperConfig, encoder=_model,
    layout=layout, converter="ftjax.convert.whisper", variants=VARIANTS, provides=("attention",),
    hf_export=HFExport("WhisperForConditionalGeneration", "whisper"))
