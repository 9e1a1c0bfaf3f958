"""Full fine-tuning: every parameter trains."""

from ftjax.models.layers import Peft


def trainable_rules(args, num_layers: int) -> list[tuple[str, bool]]:
    del args, num_layers
    return [(r".*", True)]


def peft(args) -> Peft:
    del args
    return Peft()
