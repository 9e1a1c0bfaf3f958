"""Rule helpers the method modules share."""

from __future__ import annotations

HEAD = r"head/.*"


def head_and(*patterns: str) -> list[tuple[str, bool]]:
    """Trainable rules: the task head and `patterns` train, everything else is frozen."""
    return [(HEAD, True), *((p, True) for p in patterns), (r".*", False)]
