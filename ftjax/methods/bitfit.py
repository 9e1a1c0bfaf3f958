"""BitFit (Ben Zaken et al. 2022): only bias terms (and the task head) train."""

from ftjax.models.layers import Peft
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return [(r"head/.*", True), (r".*/bias", True), (r".*", False)]


def peft(args) -> Peft:
    del args
    return Peft()
