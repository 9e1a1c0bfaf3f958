"""Pure train and eval steps, jit-compiled over one device Mesh (axis "data").

One code path serves 1 device, N devices and N hosts: parameters and optimizer state
are replicated, batches are split along their first axis over the mesh, and XLA
inserts the gradient all-reduce. No pmap.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Batch = dict[str, jax.Array]
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over all (global) devices."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Host-local numpy rows -> global arrays split over the mesh's "data" axis."""
    sharding = data_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A data-sharded global array -> the full numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def loss_and_correct(logits: jax.Array, labels: jax.Array, num_labels: int):
    """Per-example loss (cross-entropy, or squared error for 1 label) and correctness."""
    logits = logits.astype(jnp.float32)
    if num_labels == 1:
        err = logits[:, 0] - labels.astype(jnp.float32)
        return err**2, jnp.zeros_like(err)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def _apply(model: nn.Module, params, batch: Batch, *, train: bool, rng=None) -> jax.Array:
    rngs = {"dropout": rng} if train else {}
    return model.apply({"params": params}, *(batch[k] for k in INPUT_KEYS), train=train, rngs=rngs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, num_labels: int,
                    accum_steps: int = 1, trainable: Any = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Returns the pure `train_step(state, batch) -> (state, metrics)`.

    Args:
      model: the classifier module.
      tx: the optimizer (frozen leaves already map to set_to_zero).
      num_labels: number of classes, 1 for regression.
      accum_steps: micro-batches per optimizer step; gradients are averaged.
      trainable: bool tree like params; the grad norm is reported over True leaves.

    Returns:
      The un-jitted step function.
    """

    def loss_fn(params, micro, rng):
        logits = _apply(model, params, micro, train=True, rng=rng)
        loss, correct = loss_and_correct(logits, micro["label"], num_labels)
        return loss.mean(), correct.mean()

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            (loss, acc), grads = grad_fn(state.params, batch, rng)
        else:
            # Micro-batch i takes rows i, i+k, i+2k...: every micro-batch stays spread
            # over all devices instead of landing on a few.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
                batch)

            def body(carry, xs):
                i, mb = xs
                (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, acc, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
            loss, acc, grads = jax.tree.map(lambda x: x / accum_steps, (loss, acc, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if trainable is not None:
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads)}
        if num_labels == 1:
            del metrics["accuracy"]
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], jax.Array]:
    """Returns `eval_step(params, batch) -> float32 logits [B, num_labels]`."""

    def eval_step(params, batch: Batch):
        return _apply(model, params, batch, train=False).astype(jnp.float32)

    return eval_step


def jit_train_step(step_fn, mesh: Mesh, state_sharding):
    """jit with the state replicated (donated) and the batch split over "data"."""
    return jax.jit(step_fn, in_shardings=(state_sharding, data_sharded(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def jit_eval_step(eval_fn, mesh: Mesh, params_sharding):
    return jax.jit(eval_fn, in_shardings=(params_sharding, data_sharded(mesh)),
                   out_shardings=data_sharded(mesh))
