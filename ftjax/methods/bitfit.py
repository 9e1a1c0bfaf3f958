"""BitFit (Ben Zaken et al. 2022): only bias terms (and the task head) train."""

from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return head_and(r".*/bias")
