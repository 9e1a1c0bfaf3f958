"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT).

The head trains from the start; every `unfreeze_every_steps` (or `_epochs`) steps the
next layer group from the top joins: the pooler with the top layer, then each lower
layer, the embeddings last. Until its step a group gets no gradient, no moments and
no weight decay, so it stays bitwise at its pretrained value.
"""

from __future__ import annotations

from ftjax.errors import UserError
from ftjax.models.layers import Peft


def trainable_rules(args, num_layers: int) -> list[tuple[str, bool]]:
    del args, num_layers
    return [(r".*", True)]


def peft(args) -> Peft:
    del args
    return Peft()


def start_rules(args, num_layers: int, steps_per_epoch: int) -> list[tuple[str, int]]:
    """(regex, first step the params train) per layer group, top to bottom."""
    if (args.unfreeze_every_steps is None) == (args.unfreeze_every_epochs is None):
        raise UserError("method=gradual_unfreezing needs exactly one of method_args.unfreeze_every_steps "
                        "and method_args.unfreeze_every_epochs")
    every = (int(args.unfreeze_every_steps) if args.unfreeze_every_steps is not None
             else int(round(args.unfreeze_every_epochs * steps_per_epoch)))
    if every < 1:
        raise UserError(f"gradual unfreezing every {every} steps: it must be at least 1")
    rules = [(r"head/.*", 0), (r".*/pooler/.*", every)]
    rules += [(rf".*/layer_{i}/.*", (num_layers - i) * every) for i in range(num_layers)]
    rules.append((r".*", (num_layers + 1) * every))  # embeddings and anything below
    return rules
