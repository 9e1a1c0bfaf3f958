"""LayerNorm tuning: only LayerNorm scales and biases (and the task head) train."""

from ftjax.models.layers import Peft
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args
    return [(r"head/.*", True), (layout.norms, True), (r".*", False)]


def peft(args) -> Peft:
    del args
    return Peft()
