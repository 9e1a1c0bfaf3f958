"""linear_probe train time per epoch, uncached vs cached features, side by side in one run.

  python benchmarks/linear_probe_cache.py [--steps=N] [--limit=N] [--eval_limit=N]
      [--config=configs/bert_sst2.py:demo,method=linear_probe]

Both variants are the real trainer (`train.train_and_evaluate`) on the same config, batches
and optimizer, one after the other in this process; the second sets
`method_args.cache_features=True`. Train time per epoch = steps an epoch x batch size / the
trainer's examples/s over `--steps` timed steps (default: one epoch; the compile step, the
evaluation and the checkpoint are not train time). The cached run's encoding of every split
(eval mode, compiles included) is paid once per workdir and printed on its own line, with
the number of epochs after which caching has paid for itself.

  --steps       timed train steps per variant (the run takes one more: the compile step)
  --limit       data.train_limit: the first N train examples (also what the cache encodes)
  --eval_limit  data.eval_limit for dev/test (default 512; the cache encodes these too)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_config(spec: str, overrides: dict):
    """`path.py:arg` -> the locked config with `overrides` (flattened keys) applied."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None).unlock()
    config.update_from_flattened_dict(overrides)
    return config.lock()


def run(config, workdir: pathlib.Path) -> dict:
    from ftjax import train

    summary = train.train_and_evaluate(config, str(workdir))
    encode = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        encode.update({k.split("/")[-1]: v for k, v in row.items() if k.startswith("features/encode_s/")})
    return {"examples_per_s": summary["examples_per_s"], "compile_s": summary["compile_s"],
            "dev": summary["dev"], "encode": encode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bert_sst2.py:demo,method=linear_probe")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: one epoch)")
    parser.add_argument("--limit", type=int, default=None, help="data.train_limit")
    parser.add_argument("--eval_limit", type=int, default=512, help="data.eval_limit")
    args = parser.parse_args()

    from ftjax import tasks, train

    base = {"data.train_limit": args.limit, "data.eval_limit": args.eval_limit, "export": False,
            "progress_bar": False}
    config = load_config(args.config, base)
    _, data = tasks.create(config, train.resolve_model(config)[1])
    per_epoch = data.steps_per_epoch
    steps = args.steps or per_epoch
    fixed = {**base, "num_epochs": None, "total_steps": steps + 1, "eval_every_steps": steps + 1,
             "checkpoint_every_steps": steps + 1, "log_every_steps": steps + 1}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache in (("uncached", False), ("cached", True)):
            c = load_config(args.config, {**fixed, "method_args.cache_features": cache})
            results[name] = run(c, pathlib.Path(tmp) / name)
    n_train = data.num_examples("train")
    print(f"\n{args.config}: {n_train:,} train examples, batch {config.batch_size}, {per_epoch} steps an epoch; "
          f"{steps} timed steps per variant on {_devices()}")
    print(f"{'':10s} {'train s/epoch':>14s} {'examples/s':>11s} {'compile s':>10s} {'dev accuracy':>13s}")
    epoch_s = {}
    for name, r in results.items():
        epoch_s[name] = per_epoch * config.batch_size / r["examples_per_s"]
        print(f"{name:10s} {epoch_s[name]:>14.2f} {r['examples_per_s']:>11,.0f} {r['compile_s']:>10.2f} "
              f"{r['dev'].get('accuracy', float('nan')):>13.4f}")
    encode = results["cached"]["encode"]
    total = sum(encode.values())
    saved = epoch_s["uncached"] - epoch_s["cached"]
    print(f"speed-up per epoch: {epoch_s['uncached'] / epoch_s['cached']:.1f}x")
    repaid = f", repaid after {total / saved:.2f} epochs" if saved > 0 else ""
    print("encoding, paid once (cached run, compiles included): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in encode.items()) + f"; total {total:.1f} s{repaid}")


def _devices() -> str:
    import jax

    return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"


if __name__ == "__main__":
    main()
