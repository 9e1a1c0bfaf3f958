"""Parameter trees addressed by "a/b/c" paths: flattening, regex rules, strict merge."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from ftjax.errors import UserError

Rules = Sequence[tuple[str, Any]]


class MergeError(UserError):
    """A loaded tree does not fit the tree it is merged into."""


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Flattens a nested dict into {"a/b/c": leaf}."""
    out: dict[str, Any] = {}

    def visit(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    visit(tree, "")
    return out


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Inverse of `flatten`."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def path_str(key_path) -> str:
    """Turns a jax key path into "a/b/c"."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Like jax.tree_util.tree_map_with_path, with "a/b/c" string paths."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree)


def match_rule(path: str, rules: Rules) -> tuple[int, Any]:
    """Returns (index, value) of the first rule whose regex full-matches `path`."""
    for i, (pattern, value) in enumerate(rules):
        if re.fullmatch(pattern, path):
            return i, value
    raise ValueError(
        f"parameter {path!r} matches none of the rules {[p for p, _ in rules]}; "
        "add a catch-all rule such as ('.*', ...)"
    )


def tree_from_rules(tree: Any, rules: Rules) -> Any:
    """Maps each leaf of `tree` to the value of the first rule that matches its path."""
    return tree_map_with_path(lambda p, _: match_rule(p, rules)[1], tree)


def rule_table(tree: Any, rules: Rules) -> list[tuple[str, Any, int, int]]:
    """Returns [(regex, value, n_leaves, n_params)] per rule, in rule order."""
    counts = [[0, 0] for _ in rules]
    for path, leaf in flatten(tree).items():
        i, _ = match_rule(path, rules)
        counts[i][0] += 1
        counts[i][1] += int(np.prod(np.shape(leaf)))
    return [(p, v, c[0], c[1]) for (p, v), c in zip(rules, counts)]


def any_match(path: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def unmatched(patterns: Iterable[str], tree: Mapping[str, Any]) -> tuple[str, ...]:
    """The patterns that match no "a/b/c" path of `tree` (what a checkpoint lacks)."""
    paths = list(flatten(tree))
    return tuple(p for p in patterns if not any(re.fullmatch(p, k) for k in paths))


def merge(loaded: Mapping[str, Any], init: Mapping[str, Any], dont_load: Sequence[str] = ()) -> dict:
    """Strictly merges `loaded` params into `init` params.

    Every leaf of `init` is taken from `loaded` unless its path full-matches one of
    `dont_load`. Raises MergeError naming every missing, unexpected or misshapen
    parameter that `dont_load` does not excuse.

    Args:
      loaded: nested dict of arrays, e.g. converted pretrained weights.
      init: nested dict of freshly initialised arrays (defines the target structure).
      dont_load: regexes of paths kept from `init` (e.g. the task head).

    Returns:
      A nested dict with the structure of `init`.
    """
    flat_loaded, flat_init = flatten(loaded), flatten(init)
    missing, misshapen, out = [], [], {}
    for path, init_leaf in flat_init.items():
        if any_match(path, dont_load):
            out[path] = init_leaf
            continue
        if path not in flat_loaded:
            missing.append(path)
            continue
        leaf = flat_loaded[path]
        if tuple(np.shape(leaf)) != tuple(np.shape(init_leaf)):
            misshapen.append(f"{path} {tuple(np.shape(leaf))} != {tuple(np.shape(init_leaf))}")
            continue
        out[path] = np.asarray(leaf).astype(np.asarray(init_leaf).dtype) if not isinstance(
            leaf, jax.Array) else leaf.astype(init_leaf.dtype)
    unexpected = [p for p in flat_loaded if p not in flat_init and not any_match(p, dont_load)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    if misshapen:
        problems.append(f"wrong shape {len(misshapen)}: {', '.join(misshapen[:10])}" + (" ..." if len(misshapen) > 10 else ""))
    if problems:
        raise MergeError("parameters do not fit the model: " + "; ".join(problems)
                         + " (excuse paths with dont_load regexes if intended)")
    return unflatten(out)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))
