"""IA3 (Liu et al. 2022): learned vectors scale keys, values and FFN activations.

The vectors start at one (the pretrained model exactly); only they and the task head
train. `merge` folds them into the key/value kernels and the FFN output kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ftjax import tree as tree_lib
from ftjax.models.layers import Peft
from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


ADDS = (r".*/ia3_[a-z]+",)  # parameters this method adds (pretrained weights lack them)
NEEDS = ("attention",)  # encoder features it builds on (FamilySpec.provides)


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return head_and(*ADDS)


def peft(args) -> Peft:
    del args
    return Peft(ia3=True)


# Where each family's IA3 vectors fold in: (vector path suffix, the Denses it may scale, how);
# the first Dense present wins, the longest suffix first. "out": the Dense's output units
# (kernel columns and bias); "out:K/N": only the K-th of N equal column blocks (GPT-2's fused
# c_attn: query | key | value); "in": its input rows.
_FOLDS = (
    ("/self_attn/ia3_key", ("/self_attn/k_proj",), "out"),   # llama (before rotary: exact)
    ("/self_attn/ia3_value", ("/self_attn/v_proj",), "out"),
    ("/attention/ia3_key", ("/attention/key",), "out"),      # BERT-style encoders, Whisper
    ("/attention/ia3_value", ("/attention/value",), "out"),
    ("/attn/ia3_key", ("/attn/c_attn",), "out:1/3"),         # gpt2
    ("/attn/ia3_value", ("/attn/c_attn",), "out:2/3"),
    ("/mlp/ia3_ffn", ("/mlp/down_proj", "/mlp/c_proj"), "in"),
    ("/ia3_ffn", ("/output",), "in"),
)


def _fold(out: dict, path: str, scale: np.ndarray) -> None:
    for suffix, denses, how in sorted(_FOLDS, key=lambda f: -len(f[0])):
        if not path.endswith(suffix):
            continue
        base = next((path[:-len(suffix)] + d for d in denses if path[:-len(suffix)] + d + "/kernel" in out), None)
        if base is None:
            continue
        kernel = out[base + "/kernel"]
        if how == "in":
            out[base + "/kernel"] = kernel * scale[:, None]
            return
        cols = np.ones(kernel.shape[1], kernel.dtype)
        if how == "out":
            cols = scale.astype(kernel.dtype)
        else:
            k, n = (int(x) for x in how[4:].split("/"))
            width = kernel.shape[1] // n
            cols[k * width:(k + 1) * width] = scale
        out[base + "/kernel"] = kernel * cols[None, :]
        if base + "/bias" in out:
            out[base + "/bias"] = out[base + "/bias"] * cols
        return
    raise KeyError(f"IA3 vector {path}: no Dense to fold it into")


def merge(params: Any, spec: Peft | None = None) -> dict:
    """Plain params: (xW + b) * l == x (W * l) + b * l; act(h) * l W == act(h) (l[:, None] W)."""
    del spec  # the vectors carry everything
    flat = {k: np.asarray(v) for k, v in tree_lib.flatten(params).items()}
    out = {k: v for k, v in flat.items() if "/ia3_" not in k}
    for path, scale in flat.items():
        if "/ia3_" in path:
            _fold(out, path, scale)
    return tree_lib.unflatten(out)
