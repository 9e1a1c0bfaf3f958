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


def merge(params: Any, spec: Peft | None = None) -> dict:
    """Plain params: (xW + b) * l == x (W * l) + b * l; act(h) * l W == act(h) (l[:, None] W)."""
    del spec  # the vectors carry everything
    flat = {k: np.asarray(v) for k, v in tree_lib.flatten(params).items()}
    out = {k: v for k, v in flat.items() if "/ia3_" not in k}
    for path, scale in flat.items():
        if path.endswith("/attention/ia3_key") or path.endswith("/attention/ia3_value"):
            dense = path.rsplit("/", 1)[0] + ("/key" if path.endswith("key") else "/value")
            out[dense + "/kernel"] = out[dense + "/kernel"] * scale[None, :]
            out[dense + "/bias"] = out[dense + "/bias"] * scale
        elif path.endswith("/ia3_ffn"):
            kernel = path.rsplit("/", 1)[0] + "/output/kernel"
            out[kernel] = out[kernel] * scale[:, None]
    return tree_lib.unflatten(out)
