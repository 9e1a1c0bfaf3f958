"""Where the demo's peak memory goes: RSS after each phase, and XLA's own accounting.

  python benchmarks/memory.py [--config=configs/bert_sst2.py:demo] [--steps=20]

Runs the config's setup, state init (pretrained weights), the first train step
(compile), --steps further steps over real batches and one dev evaluation, in this
process, printing the resident set size (VmRSS) and its peak (VmHWM) after each phase,
then the sizes the train state accounts for (params, optimizer state) and XLA's memory
analysis of the compiled train step (arguments, outputs, temporaries). The lengths of
the batches vary (length grouping), so each new padding length compiles again, as in
the demo.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bert_sst2.py:demo", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Train steps after the first.")

MB = 1 << 20


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def main(argv):
    del argv
    rows = []

    def mark(phase: str, t0: float) -> None:
        s = _status()
        rows.append((phase, s["VmRSS"] / MB, s["VmHWM"] / MB, time.perf_counter() - t0))
        print(f"{phase:42s} rss {s['VmRSS'] / MB:8.0f} MB  peak {s['VmHWM'] / MB:8.0f} MB", flush=True)

    t0 = time.perf_counter()
    mark("python + absl", t0)
    import jax
    import numpy as np

    from ftjax import step as step_lib
    from ftjax import train
    jax.numpy.zeros(1).block_until_ready()
    mark("import jax + ftjax, CPU client", t0)

    config = _CONFIG.value
    with tempfile.TemporaryDirectory() as workdir:
        run = train.setup(config, workdir)
        mark("setup (data prepared, model + optimizer built)", t0)
        state, _, _ = train.initial_state(run)
        jax.block_until_ready(state)
        mark("train state (pretrained weights, optimizer)", t0)
        batches = run.data.train_batches(start_step=0)
        b = next(batches)
        state, m = run.train_step(state, step_lib.shard_batch(b, run.mesh))
        jax.block_until_ready(m)
        mark(f"first step (compile, length {b['input_ids'].shape[1]})", t0)
        lengths = {b["input_ids"].shape[1]}
        for _ in range(_STEPS.value):
            b = next(batches)
            lengths.add(b["input_ids"].shape[1])
            state, m = run.train_step(state, step_lib.shard_batch(b, run.mesh))
        jax.block_until_ready(m)
        mark(f"{_STEPS.value} more steps ({len(lengths)} padding lengths)", t0)
        train.evaluate(run, step_lib.variables_of(state.params, state.model_state), "dev")
        mark("dev evaluation", t0)

        def nbytes(tree) -> int:
            return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))

        print()
        print(f"params                 {nbytes(state.params) / MB:8.1f} MB")
        print(f"optimizer state        {nbytes(state.opt_state) / MB:8.1f} MB")
        print(f"model state            {nbytes(state.model_state) / MB:8.1f} MB")
        compiled = run.train_step.lower(state, step_lib.shard_batch(b, run.mesh)).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            print(f"XLA train step (length {b['input_ids'].shape[1]}): arguments "
                  f"{mem.argument_size_in_bytes / MB:.1f} MB, outputs {mem.output_size_in_bytes / MB:.1f} MB "
                  f"(aliased {mem.alias_size_in_bytes / MB:.1f} MB), temporaries {mem.temp_size_in_bytes / MB:.1f} MB, "
                  f"code {mem.generated_code_size_in_bytes / MB:.1f} MB")
        print(f"live jax buffers       {sum(x.nbytes for x in jax.live_arrays()) / MB:8.1f} MB "
              f"in {len(jax.live_arrays())} arrays")
        del np


if __name__ == "__main__":
    app.run(main)
