"""The long fuzzing campaign of every reader that takes files from strangers (issue 14).

Runs the generators of tests/test_fuzz_readers.py for many more examples than CI does,
with a fresh seed, and counts per reader: inputs tried, results, user errors (one-line
UserError) and escapes (any other exception, a multi-line message, a hang over 10 s, a
peak-RSS jump over 1 GB, or a payload's side effect). Escaping inputs are saved under
--out for replay.

  python benchmarks/fuzz_readers.py 100000                 # every reader
  python benchmarks/fuzz_readers.py 5000 --readers onnx,audio --seed 7
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", type=int, help="examples per reader, e.g. 100000")
    parser.add_argument("--readers", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="hypothesis seed")
    parser.add_argument("--out", default="/tmp/ftjax_fuzz_escapes", help="folder for escaping inputs")
    args = parser.parse_args()

    from tests import test_fuzz_readers as fz

    fz.CAMPAIGN.record = True
    names = [r for r in args.readers.split(",") if r] or sorted(fz.FUZZERS)
    print(f"seed {args.seed}, {args.examples} examples per reader", flush=True)
    print(f"{'reader':<16} {'tried':>8} {'results':>8} {'user errors':>11} {'escapes':>8} {'seconds':>8}", flush=True)
    total_escapes = 0
    with fz.os_system_extension():
        for name in names:
            start = time.time()
            _campaign_run(fz, name, args.examples, args.seed)
            c = fz.CAMPAIGN.counts[name]
            total_escapes += c["escapes"]
            print(f"{name:<16} {c['tried']:>8} {c['result']:>8} {c['user_error']:>11} {c['escapes']:>8} "
                  f"{time.time() - start:>8.0f}", flush=True)
            for i, (problem, blob) in enumerate(fz.CAMPAIGN.escapes[name]):
                out = pathlib.Path(args.out) / name
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{i}.bin").write_bytes(blob)
                print(f"  escape {i}: {problem.splitlines()[0][:200]} (input: {out / f'{i}.bin'})", flush=True)
    return 1 if total_escapes else 0


def _campaign_run(fz, name: str, examples: int, seed_value: int) -> None:
    """The reader's hypothesis test, with a random (seeded) search instead of CI's fixed one."""
    from hypothesis import HealthCheck, Phase, seed, settings

    original = fz.fuzz_settings
    fz.fuzz_settings = lambda n: settings(max_examples=n, deadline=None, derandomize=False, database=None,
                                          suppress_health_check=list(HealthCheck), phases=(Phase.generate,))
    try:
        seed(seed_value)(fz.FUZZERS[name](examples))()
    finally:
        fz.fuzz_settings = original


if __name__ == "__main__":
    sys.exit(main())
