"""Where the train step's time goes: a jax.profiler trace of the compiled step, by op kind.

  python benchmarks/profile_step.py [--config=configs/bert_sst2.py:demo] [--batch=32] [--seq=64]
                                    [--steps=3] [--top=15]

Builds the config's train step at a fixed shape (random token ids, no padding, all
parameters trained as in the config), runs it a few times, then traces --steps steps
with jax.profiler and sums the time of every XLA op the CPU runtime reports. Each op is
put in one bucket by its fusion name and the JAX op_name XLA keeps in its metadata:
matmul (YNNPACK / Eigen dots), dropout (mask generation and application), GELU,
LayerNorm, softmax, attention reshapes and layout copies, the embedding gradient
(scatter into a zeroed table), the optimizer update, and the rest. Prints the buckets,
their share of the op time, the matmul rate against a plain 2048x2048 matmul measured in
the same process, and the --top ops. Op times on two cores overlap a little (the
runtime runs independent ops concurrently), so shares are of the summed op time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bert_sst2.py:demo", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_SEQ = flags.DEFINE_integer("seq", 64, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps.")
_TOP = flags.DEFINE_integer("top", 15, "Slowest single ops to list.")

# bucket, test on (fusion name, op_name); first match wins
BUCKETS = [
    ("matmul", lambda n, o: n.startswith(("ynn_fusion", "dot", "onednn", "xnn_fusion")) or "dot_general" in o
     and not n.startswith(("copy", "transpose"))),
    ("dropout", lambda n, o: "Dropout" in o or "bernoulli" in o),
    ("GELU", lambda n, o: "/erf" in o or "gelu" in o),
    ("LayerNorm", lambda n, o: "LayerNorm" in o),
    ("softmax", lambda n, o: "softmax" in o or "/exp" in o and "attention" in o),
    ("embedding gradient", lambda n, o: "embeddings" in o and ("_take" in o or "scatter" in o)),
    ("layout copies / transposes", lambda n, o: n.startswith(("copy", "transpose")) or "reshape" in o
     or "transpose" in o.rsplit("/", 1)[-1]),
    ("optimizer update", lambda n, o: "SequenceClassifier" not in o and o != "?"),
]


def _hlo_metadata(text: str) -> dict[str, str]:
    meta = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            om = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)] = om.group(1) if om else "?"
    return meta


def _matmul_peak(jax, n: int = 2048, reps: int = 8) -> float:
    import jax.numpy as jnp
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def main(argv):
    del argv
    import jax
    import numpy as np

    from ftjax import step as step_lib
    from ftjax import train

    b, s = _BATCH.value, _SEQ.value
    config = _CONFIG.value.unlock()
    config.batch_size, config.data.max_length, config.data.bucket_lengths = b, s, (s,)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = train.setup(config, os.path.join(tmp, "w"))
        state, _, _ = train.initial_state(run)
        vocab = run.model_config.get("vocab_size", 1000)
        batch = {"input_ids": rng.integers(5, vocab, (b, s)).astype(np.int32),
                 "attention_mask": np.ones((b, s), np.int32), "token_type_ids": np.zeros((b, s), np.int32),
                 "label": rng.integers(0, run.task.num_labels if hasattr(run.task, "num_labels") else 2,
                                       (b,)).astype(np.int32)}
        batch = step_lib.shard_batch({k: v for k, v in batch.items()
                                      if k in (*run.model.input_keys, "label")}, run.mesh)
        compiled = run.train_step.lower(state, batch).compile()
        meta = _hlo_metadata(compiled.as_text())
        for _ in range(3):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        wall = []
        trace_dir = os.path.join(tmp, "trace")
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(_STEPS.value):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            wall.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        events = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]))
        events = events["traceEvents"] if isinstance(events, dict) else events
        peak = _matmul_peak(jax)
    per_op = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in meta:
            per_op[name] += e.get("dur", 0) / 1e3 / _STEPS.value  # ms per step
    buckets, counts = collections.Counter(), collections.Counter()
    for name, ms in per_op.items():
        op = meta[name]
        bucket = next((k for k, test in BUCKETS if test(name, op)), "other")
        buckets[bucket] += ms
        counts[bucket] += 1
    total = sum(buckets.values())
    cfg = run.model_config
    h, layers_, inter = cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("intermediate_size")
    print(f"{config.model.get('pretrained') or config.model.get('variant')}: batch {b} x seq {s}; step wall "
          f"{np.median(wall) * 1e3:.0f} ms (median of {len(wall)} traced); summed op time {total:.0f} ms")
    print(f"{'bucket':28s} {'ms/step':>9s} {'share':>7s} {'ops':>5s}")
    for k, ms in buckets.most_common():
        print(f"{k:28s} {ms:9.1f} {100 * ms / total:6.1f}% {counts[k]:5d}")
    if h and layers_ and inter:
        flops = 6 * b * s * layers_ * (4 * h * h + 2 * h * inter) + 6 * b * layers_ * 2 * s * s * h
        print(f"matmul: {flops / 1e9:.0f} GFLOP a step (6 x params x tokens + attention) at "
              f"{flops / buckets['matmul'] / 1e6:.0f} GFLOP/s in the matmul ops; plain 2048^2 matmul here "
              f"{peak:.0f} GFLOP/s; the whole step {flops / np.median(wall) / 1e9:.0f} GFLOP/s")
    print(f"\nslowest {_TOP.value} ops (ms/step, fusion, op_name):")
    for name, ms in per_op.most_common(_TOP.value):
        print(f"{ms:8.1f}  {name:28s} {meta[name][-90:]}")


if __name__ == "__main__":
    app.run(main)
