"""Partial fine-tuning: freeze parameters by regex and/or the embeddings + bottom k layers."""

from ftjax.errors import UserError
from ftjax.models.layers import Peft


def trainable_rules(args, num_layers: int) -> list[tuple[str, bool]]:
    k = int(args.freeze_bottom_k)
    if not 0 <= k <= num_layers:
        raise UserError(f"method_args.freeze_bottom_k={k} is outside [0, {num_layers}] layers")
    if not args.freeze and not k:
        raise UserError("method=freeze needs method_args.freeze (regexes) or method_args.freeze_bottom_k")
    rules = [(pattern, False) for pattern in args.freeze]
    if k:
        rules.append((r".*/embeddings/.*", False))
        rules.append((rf".*/layer_({'|'.join(str(i) for i in range(k))})/.*", False))
    return rules + [(r".*", True)]


def peft(args) -> Peft:
    del args
    return Peft()
