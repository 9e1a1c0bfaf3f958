"""Optimisers from ordered (regex, value) rules on parameter paths.

Three rule lists drive per-parameter behaviour (first full match wins, every leaf
must be covered):
  * `optimizer.trainable`: (regex, bool). False leaves go through
    `optax.set_to_zero()` inside `optax.multi_transform`, so they never move and hold
    no optimizer moments. (An lr of 0 does not freeze under Adam's weight decay or
    when a multiplier is later changed; `optax.masked` alone passes raw gradients.)
  * `optimizer.lr_rules`: (regex, float) learning-rate multipliers.
  * `optimizer.wd_rules`: (regex, float) weight-decay multipliers (0 for biases and
    LayerNorm by default).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ftjax import tree as tree_lib
from ftjax.errors import UserError


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup then linear / cosine / constant decay of `config.optimizer.lr`.

    Args:
      config: the experiment config (reads `optimizer.lr` and `schedule.*`).
      total_steps: number of optimizer steps of the whole run.

    Returns:
      A schedule mapping the optimizer step to the base learning rate.
    """
    lr, sched = config.optimizer.lr, config.schedule
    warmup = sched.warmup_steps
    if warmup is None:
        warmup = int(round(sched.warmup_fraction * total_steps))
    warmup = min(max(warmup, 0), total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if sched.decay == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif sched.decay == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif sched.decay == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise UserError(f"config.schedule.decay={sched.decay!r} is not one of linear, cosine, constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _map_unmasked(fn, updates, *trees):
    """tree.map over `updates` inside multi_transform, skipping other branches' MaskedNodes."""
    return jax.tree.map(lambda u, *xs: u if _is_masked(u) else fn(u, *xs), updates, *trees,
                        is_leaf=_is_masked)


def _scale_by_tree(mults: Any) -> optax.GradientTransformation:
    """Multiplies each update leaf by a fixed per-leaf float."""
    return optax.stateless(lambda updates, params=None: _map_unmasked(
        lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, mults))


def _decoupled_weight_decay(rate: float, mults: Any) -> optax.GradientTransformation:
    """AdamW-style decay `u + rate * mult * p`, with a per-leaf multiplier."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs params")
        updates = _map_unmasked(
            lambda u, p, m: u if m == 0.0 else u + (rate * m) * p.astype(u.dtype),
            updates, params, mults)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _base_direction(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if opt.name in ("adamw", "adam"):
        return optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)
    if opt.name == "sgd":
        return optax.trace(decay=opt.momentum) if opt.momentum else optax.identity()
    if opt.name == "adafactor":
        return optax.scale_by_factored_rms()
    raise UserError(f"config.optimizer.name={opt.name!r} is not one of adamw, adam, sgd, adafactor")


def _gate_until(starts: Any) -> optax.GradientTransformation:
    """Zeroes each leaf's updates before its start step (a per-leaf int)."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        updates = _map_unmasked(
            lambda u, s: u if s == 0 else jnp.where(state.count >= s, u, jnp.zeros_like(u)), updates, starts)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, total_steps: int,
                   trainable_rules=None, lr_rules=None, start_rules=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimizer from the config's rule lists.

    Args:
      config: the experiment config.
      params: the parameter tree (only its paths and shapes are used).
      total_steps: optimizer steps of the run, for the schedule.
      trainable_rules: replaces `config.optimizer.trainable` (e.g. a method's rules).
      lr_rules: replaces `config.optimizer.lr_rules`.
      start_rules: (regex, step) pairs: a leaf gets no gradient, moment or decay before
        its step (gradual unfreezing). None: every trainable leaf trains from step 0.

    Returns:
      (tx, schedule); `format_rule_table` shows what the trainable rules matched.
    """
    opt = config.optimizer
    trainable_rules = opt.trainable if trainable_rules is None else trainable_rules
    lr_rules = opt.lr_rules if lr_rules is None else lr_rules
    try:
        trainable = tree_lib.tree_from_rules(params, trainable_rules)
        lr_mults = tree_lib.tree_from_rules(params, lr_rules)
        wd_mults = tree_lib.tree_from_rules(params, opt.wd_rules)
    except ValueError as e:  # a parameter no rule covers: a config mistake
        raise UserError(str(e)) from None
    schedule = make_schedule(config, total_steps)
    parts = []
    gate = None
    if start_rules:
        gate = _gate_until(tree_lib.tree_from_rules(params, start_rules))
        parts.append(gate)  # before Adam: a gated leaf's moments stay zero
    if opt.grad_clip_norm:
        # Inside the 'train' branch: the norm is over trainable gradients only.
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    parts.append(_base_direction(opt))
    wd = opt.weight_decay if opt.name != "adam" else 0.0
    if wd:
        parts.append(_decoupled_weight_decay(wd, wd_mults))
    parts.append(_scale_by_tree(lr_mults))
    parts.append(optax.scale_by_learning_rate(schedule))
    if gate is not None:
        parts.append(gate)  # after decay: a gated leaf does not move at all
    train_tx = optax.chain(*parts)
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    tx = optax.multi_transform({"train": train_tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def trainable_count(params: Any, rules) -> int:
    """Number of scalar parameters whose trainable rule is True."""
    mask = tree_lib.tree_from_rules(params, rules)
    return int(sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m))


def format_rule_table(params: Any, rules) -> str:
    """The start-of-run table: rule, value, parameters matched, trainable total and %."""
    total = tree_lib.count_params(params)
    rows = tree_lib.rule_table(params, rules)
    width = max([len("rule")] + [len(r[0]) for r in rows])
    lines = [f"{'rule':<{width}}  {'value':>6}  {'leaves':>6}  {'params':>12}"]
    for pattern, value, leaves, n in rows:
        lines.append(f"{pattern:<{width}}  {str(value):>6}  {leaves:>6}  {n:>12,}")
    n_train = trainable_count(params, rules)
    lines.append(f"trainable {n_train:,} of {total:,} parameters ({100.0 * n_train / max(total, 1):.2f}%)")
    return "\n".join(lines)
