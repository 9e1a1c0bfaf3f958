"""Per fine-tuning method on the demo config: optimizer-state bytes, peak RSS, step speed.

  python benchmarks/methods.py [--steps=8] [--length=48] [--methods=full,lora,...]

Each method runs in its own process (so peak RSS is its own) on real demo batches
padded to one length (one compile each), with MiniLM's pretrained weights. Printed:
trainable params, optimizer-state bytes (Adam moments exist for trainable leaves only),
peak RSS, compile time and steady-state examples/s, plus each method's speed relative
to full fine-tuning measured in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

ALL = ("full", "linear_probe", "freeze", "gradual_unfreezing", "bitfit", "layernorm", "lora", "ia3",
       "adapter", "prompt", "prefix")


def measure(method: str, steps: int, length: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import bert_sst2
    from ftjax import assets, convert, methods, optim, tasks, train
    from ftjax import step as step_lib
    from ftjax import tree as tree_lib

    config = bert_sst2.get_config(f"demo,method={method}")
    mesh = step_lib.make_mesh()
    rep = step_lib.replicated(mesh)
    model_dir = assets.resolve_model_dir(config.model.pretrained)
    task, data = tasks.create(config, train.resolve_model(config)[1])
    model, hf, _ = train.build_model(config, task)
    dummy = [jnp.ones((1, 8), jnp.int32)] * 3
    params = jax.jit(lambda r: model.init(r, *dummy)["params"])(jax.random.key(0))
    params = tree_lib.merge(convert.load_pretrained(model_dir), jax.device_get(params),
                            dont_load=("head/.*",) + methods.added_params())
    layers = hf["num_hidden_layers"]
    trainable, lr = methods.rules(config, layers)
    starts = methods.start_rules(config, layers, data.steps_per_epoch)
    tx, _ = optim.make_optimizer(config, params, 1000, trainable, lr, starts)
    state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
    state = jax.device_put(state, rep)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))
    fn = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, task,
                                 trainable=tree_lib.tree_from_rules(params, trainable)),
        mesh, jax.tree.map(lambda _: rep, state))

    def fixed(b):
        pad = length - b["input_ids"].shape[1]
        return {k: (np.pad(v, ((0, 0), (0, pad))) if v.ndim == 2 else v) for k, v in b.items()}

    batches = data.train_batches(start_step=0)
    t0 = time.perf_counter()
    state, m = fn(state, step_lib.shard_batch(fixed(next(batches)), mesh))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = fn(state, step_lib.shard_batch(fixed(next(batches)), mesh))  # one warm step
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, step_lib.shard_batch(fixed(next(batches)), mesh))
    jax.block_until_ready(m)
    dt = time.perf_counter() - t0
    return {"method": method, "trainable": optim.trainable_count(params, trainable),
            "total": tree_lib.count_params(params), "opt_state_bytes": int(opt_bytes),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "compile_s": compile_s, "examples_per_s": steps * config.batch_size / dt}


def main():
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
    if "worker" in args:
        print(json.dumps(measure(args["worker"], int(args["steps"]), int(args["length"]))))
        return
    steps, length = int(args.get("steps", 8)), int(args.get("length", 48))
    chosen = args.get("methods", ",".join(ALL)).split(",")
    rows = []
    for m in chosen:
        r = subprocess.run([sys.executable, __file__, f"--worker={m}", f"--steps={steps}", f"--length={length}"],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            sys.exit(f"{m} failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = next((r["examples_per_s"] for r in rows if r["method"] == "full"), None)
    print(f"demo config, batch 32 x {length} tokens, {steps} timed steps per method, 1 process each")
    print(f"{'method':20s} {'trainable':>12s} {'%':>7s} {'opt state':>11s} {'peak RSS':>9s} "
          f"{'compile':>8s} {'ex/s':>7s} {'vs full':>8s}")
    for r in rows:
        rel = f"{r['examples_per_s'] / base:.2f}x" if base else "n/a"
        print(f"{r['method']:20s} {r['trainable']:>12,} {100 * r['trainable'] / r['total']:>6.2f}% "
              f"{r['opt_state_bytes'] / 2**20:>8.1f} MB {r['peak_rss_mb']:>6.0f} MB {r['compile_s']:>7.1f}s "
              f"{r['examples_per_s']:>7.1f} {rel:>8s}")


if __name__ == "__main__":
    main()
