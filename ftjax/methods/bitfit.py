"""BitFit (Ben Zaken et al. 2022): only bias terms (and the task head) train."""

from ftjax.models.layers import Peft


def trainable_rules(args, num_layers: int) -> list[tuple[str, bool]]:
    del args, num_layers
    return [(r"head/.*", True), (r".*/bias", True), (r".*", False)]


def peft(args) -> Peft:
    del args
    return Peft()
