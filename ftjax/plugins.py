"""Explicit registries with a module-path escape hatch, for tasks and model families.

A registry maps names to module paths; a name with a dot is itself a module path, so a
project can plug in its own task or family without editing ftjax. Nothing registers
itself on import.
"""

from __future__ import annotations

import importlib
from typing import Any

from ftjax.errors import UserError


def load(name: str, registry: dict[str, str], attribute: str, kind: type, what: str) -> Any:
    """`attribute` of the module registered as `name` (or of module `name` itself).

    Args:
      name: a registry key, or a dotted module path.
      registry: name -> module path.
      attribute: what the module exports ("TASK", "FAMILY").
      kind: the type the export must be an instance (or, for a class, a subclass) of.
      what: the config key, for messages ("config.task").

    Raises:
      UserError: one line naming the problem.
    """
    module = registry.get(name)
    if module is None and "." not in name:
        raise UserError(f"unknown {what} {name!r}; known: {', '.join(registry)} "
                        f"(or a module path that exports {attribute})")
    try:
        value = getattr(importlib.import_module(module or name), attribute)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{what}={name!r}: no module exporting {attribute} ({e})") from None
    ok = issubclass(value, kind) if isinstance(value, type) else isinstance(value, kind)
    if not ok:
        raise UserError(f"{what}={name!r}: {attribute} is not a {kind.__name__}")
    return value
