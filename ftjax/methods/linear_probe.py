"""Linear probe: only the task head trains; the encoder is a fixed feature extractor."""

from ftjax.models.layers import Peft
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return [(r"head/.*", True), (r".*", False)]


def peft(args) -> Peft:
    del args
    return Peft()
