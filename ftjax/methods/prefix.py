"""Deep prefix tuning (Li & Liang 2021; P-tuning v2, Liu et al. 2022).

Every layer's attention gets n learned key and value vectors that all tokens attend
to. With `prefix_reparam > 0` the prefixes come from an MLP over a small embedding
(Li & Liang's stabiliser); otherwise they are parameters directly (P-tuning v2).
Only the prefix parameters and the task head train.
"""

from ftjax.errors import UserError
from ftjax.models.layers import Peft
from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


ADDS = (r".*/prefix/.*",)  # parameters this method adds (pretrained weights lack them)
NEEDS = ("attention",)  # encoder features it builds on (FamilySpec.provides)


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return head_and(*ADDS)


def peft(args) -> Peft:
    if args.prefix_tokens < 1:
        raise UserError(f"method_args.prefix_tokens={args.prefix_tokens} must be >= 1")
    return Peft(prefix_tokens=int(args.prefix_tokens), prefix_reparam=int(args.prefix_reparam))
