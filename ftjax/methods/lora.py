"""LoRA (Hu et al. 2021): low-rank updates A B on Dense layers chosen by path regex.

Only the factors (and the task head; biases when `lora_train_bias`) train. `merge`
folds (alpha / r) A B into the kernels, giving a plain model with the same outputs.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.models.layers import Peft
from ftjax.models.layout import Layout


ADDS = (r".*/lora_[ab]",)  # parameters this method adds (pretrained weights lack them)
NEEDS = ("attention",)  # encoder features it builds on (FamilySpec.provides)


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del layout
    return [(r"head/.*", True), (r".*/lora_[ab]", True), (r".*/bias", bool(args.lora_train_bias)),
            (r".*", False)]


def peft(args) -> Peft:
    if args.lora_rank < 1:
        raise UserError(f"method_args.lora_rank={args.lora_rank} must be >= 1 for method=lora")
    try:
        re.compile(args.lora_targets)
    except re.error as e:
        raise UserError(f"method_args.lora_targets={args.lora_targets!r} is not a regex: {e}") from None
    return Peft(lora_rank=int(args.lora_rank), lora_alpha=float(args.lora_alpha),
                lora_dropout=float(args.lora_dropout), lora_targets=args.lora_targets)


def merge(params: Any, spec: Peft) -> dict:
    """Returns params without LoRA factors: kernel + (alpha / r) * A @ B per adapted layer."""
    flat = {k: np.asarray(v) for k, v in tree_lib.flatten(params).items()}
    out = {}
    for path, value in flat.items():
        if path.endswith(("/lora_a", "/lora_b")):
            continue
        if path.endswith("/kernel") and path[:-len("kernel")] + "lora_a" in flat:
            prefix = path[:-len("kernel")]
            delta = flat[prefix + "lora_a"] @ flat[prefix + "lora_b"] * (spec.lora_alpha / spec.lora_rank)
            value = (value + delta).astype(value.dtype)
        out[path] = value
    return tree_lib.unflatten(out)
