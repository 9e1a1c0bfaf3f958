"""Fine-tuning methods as plug-ins.

A method is one module here with
  trainable_rules(method_args, layout) -> [(regex, bool)]: what trains, in order;
and, where it has them,
  peft(method_args) -> models.layers.Peft: what it adds to the model (LoRA, ...);
  ADDS: regexes of the parameters it adds (pretrained weights and plain exports lack
    them, so they keep their init there);
  NEEDS: encoder features it builds on, checked against the family's
    `FamilySpec.provides` (LoRA, IA3, adapters, prompts, prefixes need "attention");
  post_load(params, method_args, tokenizer, seed) -> params: initialisation that needs
    the pretrained weights (prompt tuning's vocabulary init);
  merge(params, peft) -> params: fold the additions into a plain model (LoRA, IA3); a
    method that adds parameters and has no merge is exported with them;
  start_rules(method_args, layout, steps_per_epoch) -> [(regex, step)]: the step
    from which params train (gradual unfreezing);
  FROZEN_ENCODER: True when only the head trains, so `method_args.cache_features` may
    cache the encoder's outputs (linear_probe; ftjax/feature_cache.py).
It never touches the trainer. `config.method_args.layerwise_lr_decay` combines with any
method: lr x decay^(depth from the top), the head and pooler at depth 0.
"""

from __future__ import annotations

from types import ModuleType

from ftjax.errors import UserError
from ftjax.methods import (adapter, bitfit, freeze, full, gradual_unfreezing, ia3, layernorm, linear_probe,
                           lora, prefix, prompt)
from ftjax.models.layers import Peft
from ftjax.models.layout import Layout, as_layout

METHODS: dict[str, ModuleType] = {
    "full": full,
    "linear_probe": linear_probe,
    "freeze": freeze,
    "gradual_unfreezing": gradual_unfreezing,
    "bitfit": bitfit,
    "layernorm": layernorm,
    "lora": lora,
    "ia3": ia3,
    "adapter": adapter,
    "prompt": prompt,
    "prefix": prefix,
}


def get(name: str) -> ModuleType:
    if name not in METHODS:
        raise UserError(f"unknown config.method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def layerwise_lr_rules(decay: float, layout: Layout | int) -> list[tuple[str, float]]:
    """lr multipliers decay^(depth from the top): head and top 1, top block decay, ... stem."""
    if not 0 < decay <= 1:
        raise UserError(f"method_args.layerwise_lr_decay={decay} must be in (0, 1]")
    if decay == 1:
        return []
    layout = as_layout(layout)
    n = layout.num_layers
    rules = [(r"head/.*", 1.0)] + [(pattern, 1.0) for pattern in layout.top]
    rules += [(layout.groups[i + 1], decay ** (n - i)) for i in range(n)]
    rules.append((layout.groups[0], decay ** (n + 1)))
    return rules


def rules(config, layout: Layout | int) -> tuple[list, list]:
    """(trainable rules, lr rules) of the config's method, before the config's own rules.

    The config's `optimizer.trainable` / `optimizer.lr_rules` follow the method's, so
    they apply to whatever the method leaves uncovered.
    """
    method = get(config.method)
    layout = as_layout(layout)
    trainable = list(method.trainable_rules(config.method_args, layout)) + list(config.optimizer.trainable)
    lr = layerwise_lr_rules(float(config.method_args.layerwise_lr_decay), layout)
    return trainable, lr + list(config.optimizer.lr_rules)


def peft(config) -> Peft:
    """The model-side additions of the config's method (none: a plain Peft())."""
    method = get(config.method)
    return method.peft(config.method_args) if hasattr(method, "peft") else Peft()


def added_params() -> tuple[str, ...]:
    """Regexes of every parameter any method adds (what pretrained weights never hold)."""
    return tuple(p for m in METHODS.values() for p in getattr(m, "ADDS", ()))


def check_family(config, family) -> None:
    """One clear line when the method needs an encoder feature the family lacks."""
    missing = [n for n in getattr(get(config.method), "NEEDS", ()) if n not in family.provides]
    if missing:
        fits = [name for name, m in METHODS.items() if not set(getattr(m, "NEEDS", ())) - set(family.provides)]
        raise UserError(f"method={config.method} needs {' and '.join(missing)} blocks, and the {family.name} "
                        f"encoder has no {' or '.join(missing)} blocks; use one of {', '.join(fits)} "
                        "(layerwise_lr_decay combines with any)")


def post_load(config, params, tokenizer):
    """Applies the method's initialisation that needs the loaded (pretrained) params."""
    method = get(config.method)
    if hasattr(method, "post_load"):
        return method.post_load(params, config.method_args, tokenizer, config.seed)
    return params


def merged_for_export(config, params, peft_spec: Peft):
    """Plain-model params for export, or None when the method adds parameters it cannot merge."""
    method = get(config.method)
    if hasattr(method, "merge"):
        return method.merge(params, peft_spec)
    if getattr(method, "ADDS", ()):
        return None
    return params


def caches_features(config) -> bool:
    """Whether the run trains its head on cached encoder features (`method_args.cache_features`).

    Raises:
      UserError: caching is asked for a method that trains more than the head.
    """
    if not config.method_args.cache_features:
        return False
    if not getattr(get(config.method), "FROZEN_ENCODER", False):
        fits = [name for name, m in METHODS.items() if getattr(m, "FROZEN_ENCODER", False)]
        raise UserError(f"method_args.cache_features=True caches the outputs of a frozen encoder, and "
                        f"method={config.method} trains the encoder; use method={' or '.join(fits)}, or set "
                        "method_args.cache_features=False")
    return True


def start_rules(config, layout: Layout | int, steps_per_epoch: int):
    """[(regex, first training step)] of the method, or None when everything starts at once."""
    method = get(config.method)
    if hasattr(method, "start_rules"):
        return method.start_rules(config.method_args, as_layout(layout), steps_per_epoch)
    return None
