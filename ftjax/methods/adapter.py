"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

`houlsby`: an adapter after the attention output and one after the FFN output;
`pfeiffer`: after the FFN only. Identity at init: the down projection is normal
(std 1e-2), the up projection zero. As in the paper, the adapters, every LayerNorm and
the task head train. Adapters add layers,
so they cannot be merged into a plain BERT.
"""

from ftjax.errors import UserError
from ftjax.models.layers import Peft
from ftjax.methods.common import head_and
from ftjax.models.layout import Layout


ADDS = (r".*_adapter/.*",)  # parameters this method adds (pretrained weights lack them)
NEEDS = ("attention",)  # encoder features it builds on (FamilySpec.provides)


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args
    return head_and(*ADDS, layout.norms)


def peft(args) -> Peft:
    if args.adapter_kind not in ("houlsby", "pfeiffer"):
        raise UserError(f"method_args.adapter_kind={args.adapter_kind!r} is not houlsby or pfeiffer")
    if args.adapter_size < 1:
        raise UserError(f"method_args.adapter_size={args.adapter_size} must be >= 1")
    return Peft(adapter=args.adapter_kind, adapter_size=int(args.adapter_size),
                adapter_init_std=float(args.adapter_init_std))
