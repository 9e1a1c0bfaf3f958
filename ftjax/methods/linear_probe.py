"""Linear probe: only the task head trains; the encoder is a fixed feature extractor."""

from ftjax.models.layers import Peft


def trainable_rules(args, num_layers: int) -> list[tuple[str, bool]]:
    del args, num_layers
    return [(r"head/.*", True), (r".*", False)]


def peft(args) -> Peft:
    del args
    return Peft()
