"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT).

The head trains from the start; every `unfreeze_every_steps` (or `_epochs`) steps the
next layer group from the top joins: the pooler with the top layer, then each lower
layer, the embeddings last. Until its step a group gets no gradient, no moments and
no weight decay, so it stays bitwise at its pretrained value.
"""

from __future__ import annotations

from ftjax.errors import UserError
from ftjax.methods.full import trainable_rules  # noqa: F401 (everything trains, once started)
from ftjax.models.layout import Layout



def start_rules(args, layout: Layout, steps_per_epoch: int) -> list[tuple[str, int]]:
    """(regex, first step the params train) per layer group, top to bottom."""
    if (args.unfreeze_every_steps is None) == (args.unfreeze_every_epochs is None):
        raise UserError("method=gradual_unfreezing needs exactly one of method_args.unfreeze_every_steps "
                        "and method_args.unfreeze_every_epochs")
    every = (int(args.unfreeze_every_steps) if args.unfreeze_every_steps is not None
             else int(round(args.unfreeze_every_epochs * steps_per_epoch)))
    if every < 1:
        raise UserError(f"gradual unfreezing every {every} steps: it must be at least 1")
    n = layout.num_layers
    rules = [(r"head/.*", 0)] + [(pattern, every) for pattern in layout.top]
    rules += [(layout.groups[i + 1], (n - i) * every) for i in range(n)]
    rules.append((r".*", (n + 1) * every))  # the stem and anything below
    return rules
