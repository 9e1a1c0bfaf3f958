"""Pure train and eval steps, jit-compiled over one device Mesh (axis "data").

One code path serves 1 device, N devices and N hosts: parameters and optimizer state
are replicated, batches are split along their first axis over the mesh, and XLA
inserts the gradient all-reduce. No pmap.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.tasks import apply

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """What a train step updates.

    Attributes:
      step: optimizer steps taken.
      params: the "params" collection.
      opt_state: the optimizer state (no moments for frozen leaves).
      rng: key data; each step folds in its step number.
      model_state: the model's other collections, e.g. {"batch_stats": ...} for
        BatchNorm encoders; {} for the transformers.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any = flax.struct.field(default_factory=dict)


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over all (global) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def abstract(tree: Any, sharding) -> Any:
    """`tree`'s shapes and dtypes as ShapeDtypeStructs placed on `sharding` (restore targets)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Host-local numpy rows -> global arrays split over the mesh's "data" axis."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A data-sharded global array -> the full numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def updates_batch_stats(model: nn.Module, model_state) -> bool:
    """Whether train steps update BatchNorm statistics (else they use the stored ones)."""
    return bool(getattr(model, "update_batch_stats", False)) and "batch_stats" in model_state


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, task, *,
                    accum_steps: int = 1, trainable: Any = None, skip_nonfinite: bool = False,
                    forward: Callable | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Returns the pure `train_step(state, batch) -> (state, metrics)`.

    Metrics are "loss", the task's train metrics and "grad_norm" (+ "skipped").

    Args:
      model: the task's model.
      tx: the optimizer (frozen leaves already map to set_to_zero).
      task: the task (ftjax/tasks/): `task.loss(outputs, batch)`.
      accum_steps: micro-batches per optimizer step; gradients are averaged.
      trainable: bool tree like params; the grad norm is reported over True leaves.
      skip_nonfinite: a step whose loss or trainable gradient norm is NaN/Inf leaves
        params, optimizer and model state as they were (the step counter still moves,
        so the data moves on); metrics gain "skipped" (1.0 for such a step).
      forward: `forward(variables, batch, train=, rng=, mutable=)` -> the model's outputs, in
        place of the model on its input keys (`tasks.apply`): the head alone on cached
        features takes batch["features"] (ftjax/feature_cache.py).

    Returns:
      The un-jitted step function.
    """
    forward = forward or functools.partial(apply, model)

    def loss_fn(params, model_state, micro, rng):
        variables = {"params": params, **model_state}
        if updates_batch_stats(model, model_state):
            outputs, new = forward(variables, micro, train=True, rng=rng, mutable=["batch_stats"])
            model_state = {**model_state, **new}
        else:
            outputs = forward(variables, micro, train=True, rng=rng)
        loss, metrics = task.loss(outputs, micro)
        return loss, (metrics, model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            (loss, (task_metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng)
        else:
            # Micro-batch i takes rows i, i+k, i+2k...: every micro-batch stays spread
            # over all devices instead of landing on a few.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
                batch)

            def body(carry, xs):
                sums, ms = carry  # BatchNorm statistics pass from one micro-batch to the next
                i, mb = xs
                (l, (a, ms)), g = grad_fn(state.params, ms, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, sums, (l, a, g)), ms), None

            metric_shapes = jax.eval_shape(lambda: grad_fn(state.params, state.model_state,
                                                           jax.tree.map(lambda x: x[0], micro), rng)[0][1][0])
            zeros = (jnp.zeros(()), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
                     jax.tree.map(jnp.zeros_like, state.params))
            ((loss, task_metrics, grads), model_state), _ = jax.lax.scan(
                body, (zeros, state.model_state), (jnp.arange(accum_steps), micro))
            loss, task_metrics, grads = jax.tree.map(lambda x: x / accum_steps, (loss, task_metrics, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if trainable is not None:
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
        grad_norm = optax.global_norm(grads)
        metrics = {"loss": loss, **task_metrics, "grad_norm": grad_norm}
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state, model_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (params, opt_state, model_state),
                (state.params, state.opt_state, state.model_state))
            metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, task) -> Callable[[Any, Batch], Any]:
    """Returns `eval_step(variables, batch) -> task.predict(model, variables, batch)`.

    `variables` is {"params": ..., **model_state} (see `variables_of`).
    """

    def eval_step(variables, batch: Batch):
        return task.predict(model, variables, batch)

    return eval_step


def variables_of(params, model_state=None) -> dict:
    """The Linen variables dict of params plus the model's other collections."""
    return {"params": params, **(model_state or {})}


def jit_train_step(step_fn, mesh: Mesh, state_sharding):
    """jit with the state replicated (donated) and the batch split over "data"."""
    return jax.jit(step_fn, in_shardings=(state_sharding, data_sharded(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_fn, mesh: Mesh, params_sharding):
    return jax.jit(eval_fn, in_shardings=(params_sharding, data_sharded(mesh)),
                   out_shardings=data_sharded(mesh))
