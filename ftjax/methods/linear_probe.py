"""Linear probe: only the task head trains; the encoder is a fixed feature extractor.

With `method_args.cache_features=True` (big_vision-style linear probes) the frozen
encoder runs once, in eval mode (no dropout), over every example of each split; its
features (the head's input: the pooled vector) are stored in W/features/ and the head
trains, with its own dropout, on them (ftjax/feature_cache.py): the same batches,
optimizer, evaluations and checkpoints, at a fraction of the cost per epoch. Off by
default: the encoder then runs in train mode (its dropout on) at every step, as before.
"""

from ftjax.methods.common import head_and
from ftjax.models.layout import Layout

# Only the head trains, so the encoder's outputs may be computed once and cached.
FROZEN_ENCODER = True


def trainable_rules(args, layout: Layout) -> list[tuple[str, bool]]:
    del args, layout
    return head_and()
