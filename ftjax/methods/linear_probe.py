"""Linear probe: only the task head trains; the encoder is a fixed feature extractor."""

from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return head_and()
