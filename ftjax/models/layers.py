"""Layers shared by the encoders, with the parameter-efficient additions methods switch on.

`Peft` carries the model-side options of a fine-tuning method (ftjax/methods/). Layers
decide by regex on their own module path ("bert/encoder/layer_3/attention/query"), not
by class, so the same options serve every encoder family.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


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
            h = nn.Dropout(p.lora_dropout, deterministic=not train)(x)
            y = y + (h @ a.astype(self.dtype)) @ b.astype(self.dtype) * (p.lora_alpha / p.lora_rank)
        return y


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
            nn.gelu(h, approximate=False))
        return x + h
