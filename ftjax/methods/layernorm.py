"""LayerNorm tuning: only LayerNorm scales and biases (and the task head) train."""

from ftjax.models.layers import Peft


def trainable_rules(args, num_layers: int) -> list[tuple[str, bool]]:
    del args, num_layers
    return [(r"head/.*", True), (r".*LayerNorm.*", True), (r".*", False)]


def peft(args) -> Peft:
    del args
    return Peft()
