"""Full fine-tuning: every parameter trains."""

from ftjax.models.layers import Peft
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return [(r".*", True)]


def peft(args) -> Peft:
    del args
    return Peft()
