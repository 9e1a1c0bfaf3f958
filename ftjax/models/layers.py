"""Layers shared by the encoders, with the parameter-efficient additions methods switch on.

`Peft` carries the model-side options of a fine-tuning method (ftjax/methods/). Layers
decide by regex on their own module path ("bert/encoder/layer_3/attention/query"), not
by class, so the same options serve every encoder family.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import UserError


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, x * (1 + erf(x / sqrt 2)) / 2, as torch computes it.

    jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates ~3.5x
    slower than erf; the two agree within 1e-6. Half-precision inputs are computed in
    float32 (1 + erf cancels for negative x) and the result cast back.
    """
    f = x.astype(jnp.float32)
    return (0.5 * f * (1.0 + jax.lax.erf(f * np.float32(1.0 / math.sqrt(2.0))))).astype(x.dtype)


# config.json "hidden_act" names -> functions, for every family that reads one.
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# Dropout keeps an element where 16 random bits fall under round(keep * 2**16).
KEEP_BITS = 16


def keep_mask(rng: jax.Array, keep: float, shape: tuple[int, ...]) -> tuple[jax.Array, float]:
    """A boolean keep mask of `shape` and the scale that preserves the mean.

    Each element keeps with probability t / 2**16, t = round(keep * 2**16) (within
    7.7e-6 of `keep`); the scale is 2**16 / t, so the expectation of mask * scale * x
    is x exactly. Every threefry draw yields 32 bits, split into two 16-bit halves:
    one draw per two elements instead of one per element as in a float uniform
    (jax.random.bernoulli), which makes the masks ~3x cheaper on CPU.

    Args:
      rng: a PRNG key.
      keep: the keep probability, in (0, 1).
      shape: the mask's shape (the batch dimension first, so it shards like the data).

    Returns:
      (mask, scale).
    """
    levels = 1 << KEEP_BITS
    t = min(max(round(keep * levels), 1), levels - 1)
    if not shape:
        return jax.random.bits(rng, (), jnp.uint16) < t, levels / t
    last = shape[-1]
    words = jax.random.bits(rng, (*shape[:-1], (last + 1) // 2), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(last / 2), 2]
    halves = halves.reshape(*shape[:-1], 2 * ((last + 1) // 2))[..., :last]
    return halves < t, levels / t


class Dropout(nn.Module):
    """Inverted dropout with 16-bit keep masks (`keep_mask`); nn.Dropout's interface.

    The class shares nn.Dropout's name, so auto-named instances ("Dropout_0") and
    their `make_rng` streams are those nn.Dropout had.

    Attributes:
      rate: the drop probability.
      broadcast_dims: dimensions sharing one mask value (e.g. (1, 2, 3): per example).
      deterministic: no dropout when True (may be given at call time instead).
      rng_collection: the rng stream.
    """

    rate: float
    broadcast_dims: tuple[int, ...] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        shape = tuple(1 if d in self.broadcast_dims or d - inputs.ndim in self.broadcast_dims else n
                      for d, n in enumerate(inputs.shape))
        mask, scale = keep_mask(rng, 1.0 - self.rate, shape)
        return jax.lax.select(jnp.broadcast_to(mask, inputs.shape), inputs * jnp.asarray(scale, inputs.dtype),
                              jnp.zeros_like(inputs))


class Conv(nn.Module):
    """nn.Conv on NHWC inputs (HWIO kernel [kh, kw, C / groups, features], the same
    "kernel" and "bias" parameters and inits) that runs as a matrix product where one
    is exact: a 1x1 kernel of one group with no padding (over channels; strided: on every
    stride-th pixel), and a kernel that tiles the image (stride = kernel, "VALID": ViT's
    patch embedding, over each patch's pixels). XLA:CPU runs products through its fast
    matmul path and convolutions through a much slower one; ResNet's bottlenecks and
    EfficientNet's expand/project convs are 1x1.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: "SAME", "VALID" or ((top, bottom), (left, right)).
      feature_group_count: groups (channels / groups inputs per output).
      dtype: the computation dtype.
      param_dtype: the kernel's dtype.
      kernel_init: the kernel's initializer.
      use_bias: add a "bias" [features] (zeros at init).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    feature_group_count: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, x.shape[-1] // self.feature_group_count, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        (sh, sw), (b, h, w, c) = self.strides, x.shape
        unpadded = self.padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in self.padding)
        dot = lambda a, k: jax.lax.dot_general(a, k, (((a.ndim - 1,), (0,)), ((), ())))  # noqa: E731
        if self.feature_group_count != 1:
            y = None
        elif (kh, kw) == (1, 1) and unpadded:
            y = dot(x[:, ::sh, ::sw] if (sh, sw) != (1, 1) else x, kernel[0, 0])
        elif (kh, kw) == (sh, sw) and self.padding == "VALID" and h % kh == 0 and w % kw == 0:
            patches = x.reshape(b, h // kh, kh, w // kw, kw, c).transpose(0, 1, 3, 2, 4, 5)
            y = dot(patches.reshape(b, h // kh, w // kw, kh * kw * c), kernel.reshape(kh * kw * c, -1))
        else:
            y = None
        if y is None:
            padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
            y = jax.lax.conv_general_dilated(x, kernel, (sh, sw), padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=self.feature_group_count)
        return y if bias is None else y + bias.astype(self.dtype)


def check_heads(hidden: int, heads: int, hidden_name: str = "hidden_size",
                heads_name: str = "num_attention_heads") -> None:
    """Raises a one-line UserError unless `heads` attention heads split `hidden` evenly.

    Args:
      hidden: the model width.
      heads: the number of attention heads.
      hidden_name: the config.json name of `hidden`, for the message.
      heads_name: the config.json name of `heads`, for the message.
    """
    if hidden % heads:
        raise UserError(f"{hidden_name} {hidden} is not divisible by {heads_name} {heads}")


def check_absolute_positions(hf: dict[str, Any]) -> None:
    """Raises a one-line UserError when a config.json asks for non-absolute position embeddings."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"position_embedding_type={hf['position_embedding_type']!r}: only absolute is supported")


def config_from_hf(cls, hf: dict[str, Any], **convert: Callable[[Any], Any]):
    """A config dataclass from a config.json dict: the fields `cls` declares, nothing else.

    Keys that are not fields, and null values, are ignored (the dataclass default
    applies). A `hidden_act` field must name one of ACTIVATIONS.

    Args:
      cls: the family's frozen config dataclass.
      hf: the config.json dict.
      **convert: field name -> function applied to that value (e.g. lists to tuples).

    Returns:
      An instance of `cls`.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in hf.items() if k in names and v is not None}
    for key, fn in convert.items():
        if key in kw:
            kw[key] = fn(kw[key])
    cfg = cls(**kw)
    act = getattr(cfg, "hidden_act", None)
    if act is not None and act not in ACTIVATIONS:
        raise UserError(f"hidden_act={act!r} is not supported ({', '.join(ACTIVATIONS)})")
    return cfg


@dataclasses.dataclass(frozen=True)
class Peft:
    """Model-side options of a fine-tuning method.

    Attributes:
      lora_rank: LoRA rank r; 0 disables LoRA.
      lora_alpha: LoRA scale numerator (updates scaled by alpha / r).
      lora_dropout: dropout on the LoRA branch's input.
      lora_targets: regex full-matched against Dense module paths.
      ia3: learned scaling vectors on keys, values and the FFN activations (Liu et al. 2022).
      adapter: bottleneck adapters, "houlsby" or "pfeiffer" (Houlsby et al. 2019).
      adapter_size: adapter bottleneck width.
      adapter_init_std: std of the adapters' normal init (near identity).
      prompt_tokens: soft prompt vectors prepended to the input embeddings (Lester et al. 2021).
      prefix_tokens: per-layer key/value prefixes (deep prefix tuning, P-tuning v2).
      prefix_reparam: MLP width that produces the prefixes from a small embedding.
    """

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = r".*/attention/(query|value)"
    ia3: bool = False
    adapter: str = ""  # "", "houlsby" (after attention and FFN) or "pfeiffer" (after FFN)
    adapter_size: int = 64
    adapter_init_std: float = 1e-2
    prompt_tokens: int = 0
    prefix_tokens: int = 0
    prefix_reparam: int = 0  # hidden width of the prefix MLP; 0 = prefixes are params directly


class Dense(nn.Module):
    """nn.Dense (params "kernel", "bias") plus an optional LoRA branch.

    With LoRA on this path: y = x W + b + (alpha / r) * dropout(x) A B, with A
    ("lora_a", [in, r]) random and B ("lora_b", [r, out]) zero, so the layer starts
    exactly as the pretrained one (Hu et al. 2021).
    """

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    peft: Peft = Peft()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        p = self.peft
        if p.lora_rank and re.fullmatch(p.lora_targets, "/".join(self.path)):
            a = self.param("lora_a", nn.initializers.kaiming_uniform(), (x.shape[-1], p.lora_rank), jnp.float32)
            b = self.param("lora_b", nn.initializers.zeros, (p.lora_rank, self.features), jnp.float32)
            h = Dropout(p.lora_dropout, deterministic=not train)(x)
            y = y + (h @ a.astype(self.dtype)) @ b.astype(self.dtype) * (p.lora_alpha / p.lora_rank)
        return y


def normal_dense(config: Any, features: int, name: str, dtype: Any, peft: Peft) -> Dense:
    """A Dense (LoRA-capable) whose kernel starts normal(config.initializer_range)."""
    return Dense(features, name=name, dtype=dtype, peft=peft,
                 kernel_init=nn.initializers.normal(config.initializer_range))


def layer_norm(config: Any, name: str, dtype: Any) -> nn.LayerNorm:
    """A LayerNorm with config.layer_norm_eps and float32 parameters."""
    return nn.LayerNorm(epsilon=config.layer_norm_eps, name=name, dtype=dtype, param_dtype=jnp.float32)


class Adapter(nn.Module):
    """Bottleneck adapter x + up(gelu(down(x))).

    `down` starts normal(init_std) and `up` at zero, so the adapter starts as the
    identity and the model as the pretrained one, while `up` still gets gradients.
    """

    size: int
    init_std: float = 1e-2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(self.init_std)
        h = nn.Dense(self.size, name="down", kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32)(x)
        h = nn.Dense(x.shape[-1], name="up", kernel_init=nn.initializers.zeros, dtype=self.dtype,
                     param_dtype=jnp.float32)(
            gelu(h))
        return x + h


class SelfAttention(nn.Module):
    """Multi-head self-attention with the PEFT hooks (LoRA via Dense, IA3, deep prefixes).

    Shared by the transformer encoders: BERT (output Dense "out", padding bias) and ViT
    (output "output", no bias). `config` needs hidden_size, num_attention_heads and
    initializer_range.

    Attributes:
      kernel_init: the projections' init; None: normal(config.initializer_range).
      output_name: name of the output projection.
    """

    config: Any
    attention_dropout: float
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    kernel_init: Any = None
    output_name: str = "out"

    @nn.compact
    def __call__(self, x, bias=None, *, train: bool, prefix=None):
        cfg = self.config
        heads, width = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, width)  # noqa: E731
        init = self.kernel_init or nn.initializers.normal(cfg.initializer_range)
        dense = lambda name: Dense(cfg.hidden_size, name=name, dtype=self.dtype, peft=self.peft,  # noqa: E731
                                   kernel_init=init)
        q = dense("query")(x, train=train)
        k = dense("key")(x, train=train)
        v = dense("value")(x, train=train)
        if self.peft.ia3:
            ones = nn.initializers.ones
            k = k * self.param("ia3_key", ones, (cfg.hidden_size,), jnp.float32).astype(k.dtype)
            v = v * self.param("ia3_value", ones, (cfg.hidden_size,), jnp.float32).astype(v.dtype)
        if prefix is not None:  # deep prefix tuning: learned keys/values every query sees
            pk, pv = (jnp.broadcast_to(t.astype(k.dtype), (x.shape[0], *t.shape)) for t in prefix)
            k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
            if bias is not None:
                bias = jnp.concatenate([jnp.zeros((*bias.shape[:-1], pk.shape[1]), bias.dtype), bias], -1)
        q, k, v = split(q), split(k), split(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(width)
        probs = jax.nn.softmax(scores if bias is None else scores + bias, axis=-1)
        probs = Dropout(self.attention_dropout, deterministic=not train)(probs).astype(self.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
        return dense(self.output_name)(ctx, train=train)


class PrefixEncoder(nn.Module):
    """Per-layer (key, value) prefixes [n, hidden]: params, or an MLP over an embedding.

    `config` needs num_hidden_layers, hidden_size and initializer_range.
    """

    config: Any
    peft: Peft

    @nn.compact
    def __call__(self):
        cfg, n = self.config, self.peft.prefix_tokens
        layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
        init = nn.initializers.normal(cfg.initializer_range)
        if self.peft.prefix_reparam:
            e = self.param("embedding", init, (n, hidden), jnp.float32)
            h = jnp.tanh(nn.Dense(self.peft.prefix_reparam, name="mlp_in")(e))
            kv = nn.Dense(layers * 2 * hidden, name="mlp_out")(h)
        else:
            kv = self.param("key_values", init, (n, layers * 2 * hidden), jnp.float32)
        kv = kv.reshape(n, layers, 2, hidden)
        return [(kv[:, i, 0], kv[:, i, 1]) for i in range(layers)]


def prepend_prompt(module: nn.Module, x, attention_mask, peft: Peft, initializer_range: float):
    """Prompt tuning: `peft.prompt_tokens` learned vectors (`module`'s "prompt" param) before the tokens.

    Call it inside `module`'s compact __call__, on the embedded tokens. The prompt sees
    and is seen by every token; the caller drops the first `peft.prompt_tokens` outputs
    so that heads see the real tokens only.

    Returns:
      (x with the prompt first, the attention mask extended with ones).
    """
    n = peft.prompt_tokens
    if not n:
        return x, attention_mask
    prompt = module.param("prompt", nn.initializers.normal(initializer_range), (n, x.shape[-1]), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], *prompt.shape)), x], 1)
    return x, jnp.concatenate([jnp.ones((x.shape[0], n), attention_mask.dtype), attention_mask], 1)


def padding_bias(attention_mask):
    """[B, 1, 1, L] additive attention bias: 0 for real keys, -1e9 for padding.

    float32, so bf16 compute cannot overflow it.
    """
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
