"""Full fine-tuning: every parameter trains."""

from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return [(r".*", True)]
