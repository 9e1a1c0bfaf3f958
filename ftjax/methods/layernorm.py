"""LayerNorm tuning: only LayerNorm scales and biases (and the task head) train."""

from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args
    return head_and(layout.norms)
