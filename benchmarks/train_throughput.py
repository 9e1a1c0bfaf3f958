"""Steady-state throughput of the demo train step, after compile.

  python benchmarks/train_throughput.py [--config=configs/bert_sst2.py:demo] [--steps=20]

Runs real batches of the config's train split. With dynamic padding the first batch of
each length compiles: those steps make up the compile time. Over --steps further
batches (steady state) it prints padded tokens/s, real tokens/s and examples/s.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bert_sst2.py:demo", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftjax import optim, tasks, train
    from ftjax import step as step_lib

    config = _CONFIG.value
    mesh = step_lib.make_mesh()
    rep = step_lib.replicated(mesh)
    task, data = tasks.create(config, train.resolve_model(config)[1])
    model, _, _ = train.build_model(config, task)
    dummy = [jnp.ones((1, 8), jnp.int32)] * 3
    params = jax.jit(lambda r: model.init(r, *dummy)["params"], out_shardings=rep)(jax.random.key(0))
    tx, _ = optim.make_optimizer(config, params, 1000)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
    state = jax.device_put(state, rep)
    fn = step_lib.jit_train_step(step_lib.make_train_step(model, tx, task,
                                                          accum_steps=config.accum_steps),
                                 mesh, jax.tree.map(lambda _: rep, state))
    batches = data.train_batches(start_step=0)
    # Dynamic padding: the first step of each new length compiles. Those steps count as
    # compile time; the rest are the steady state.
    seen, compile_s = set(), 0.0
    padded = real = examples = 0
    steady_s, timed = 0.0, 0
    while timed < _STEPS.value:
        b = next(batches)
        t0 = time.perf_counter()
        state, m = fn(state, step_lib.shard_batch(b, mesh))
        jax.block_until_ready(m)
        dt_step = time.perf_counter() - t0
        length = b["input_ids"].shape[1]
        if length not in seen:
            seen.add(length)
            compile_s += dt_step
            continue
        timed += 1
        steady_s += dt_step
        padded += b["attention_mask"].size
        real += int(b["attention_mask"].sum())
        examples += b["input_ids"].shape[0]
    dt = steady_s
    print(f"devices            {mesh.size} x {jax.devices()[0].platform}")
    print(f"compile            {compile_s:.2f} s for {len(seen)} lengths {sorted(seen)}")
    print(f"step               {dt / _STEPS.value:.3f} s (batch {config.batch_size})")
    print(f"padded tokens/s    {padded / dt:,.0f}")
    print(f"real tokens/s      {real / dt:,.0f}")
    print(f"examples/s         {examples / dt:,.1f}")
    print(f"loss               {float(np.asarray(m['loss'])):.4f}")


if __name__ == "__main__":
    app.run(main)
