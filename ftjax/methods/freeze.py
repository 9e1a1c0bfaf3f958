"""Partial fine-tuning: freeze parameters by regex and/or the embeddings + bottom k layers."""

from ftjax.errors import UserError
from ftjax.models.layout import Layout


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    k = int(args.freeze_bottom_k)
    if not 0 <= k <= layout.num_layers:
        raise UserError(f"method_args.freeze_bottom_k={k} is outside [0, {layout.num_layers}] layers")
    if not args.freeze and not k:
        raise UserError("method=freeze needs method_args.freeze (regexes) or method_args.freeze_bottom_k")
    rules = [(pattern, False) for pattern in args.freeze]
    if k:
        # the stem (embeddings) and the k lowest blocks
        rules += [(pattern, False) for pattern in layout.groups[:k + 1]]
    return rules + [(r".*", True)]
