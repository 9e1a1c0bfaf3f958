r"""Checks that a code change leaves every logged number unchanged, bit for bit.

Runs the smoke configs below in a checkout, records each run's `train/loss` values
(exactly as written to `metrics.jsonl`) and its `summary.json` `trainable_params`,
and compares the record with one made at another commit:

  # at the commit before a change (a second checkout, e.g. `git worktree add ../before HEAD~1`)
  python benchmarks/same_numbers.py record --repo=../before --out=/tmp/before.json
  # at the change
  python benchmarks/same_numbers.py record --repo=. --out=/tmp/after.json
  python benchmarks/same_numbers.py compare /tmp/before.json /tmp/after.json

`compare` prints one line per run and exits 1 on any difference. Records are resumable:
a run already in the output file is not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

BERT = "configs/bert_sst2.py:demo,runlocal"
# (name, config, extra flags, whether the losses are compared)
RUNS = [(f"bert/{m}", f"{BERT},method={m}", [], m in ("full", "lora", "adapter", "prefix"))
        for m in ("full", "lora", "adapter", "prefix", "linear_probe", "freeze",
                  "gradual_unfreezing", "bitfit", "layernorm", "ia3", "prompt")]
RUNS.append(("effnet/full", "configs/effnet_fashion_mnist.py:runlocal", [], True))


def _losses(workdir: pathlib.Path) -> list[list]:
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            # repr of the float keeps every bit; JSON text is what the run wrote
            out.append([row["step"], repr(row["train/loss"])])
    return out


def record(repo: pathlib.Path, out: pathlib.Path, only: list[str] | None) -> None:
    done = json.loads(out.read_text()) if out.exists() else {}
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as a user's run
    for name, config, flags, full in RUNS:
        if name in done or (only and name not in only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            workdir = pathlib.Path(tmp) / "w"
            steps = [] if full else ["--config.total_steps=2", "--config.eval_every_steps=2",
                                     "--config.checkpoint_every_steps=2"]
            cmd = [sys.executable, "-m", "ftjax.main", f"--config={config}", f"--workdir={workdir}",
                   "--config.progress_bar=False", *steps, *flags]
            print(f"{name}: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, cwd=repo, env=env, check=True)
            summary = json.loads((workdir / "summary.json").read_text())
            done[name] = {"trainable_params": summary["trainable_params"],
                          "total_params": summary["total_params"],
                          "losses": _losses(workdir) if full else None}
        out.write_text(json.dumps(done, indent=1))


def compare(a: dict, b: dict) -> bool:
    same = True
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'first' if name in a else 'second'}")
            same = False
            continue
        x, y = a[name], b[name]
        diffs = [k for k in ("trainable_params", "total_params", "losses") if x[k] != y[k]]
        n = len(x["losses"] or [])
        print(f"{name}: {'DIFFERENT ' + ', '.join(diffs) if diffs else 'identical'}"
              f" (trainable {x['trainable_params']:,}, {n} losses)")
        same &= not diffs
    return same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--repo", default=".")
    r.add_argument("--out", required=True)
    r.add_argument("--only", nargs="*")
    c = sub.add_parser("compare")
    c.add_argument("first")
    c.add_argument("second")
    args = p.parse_args()
    if args.cmd == "record":
        record(pathlib.Path(args.repo).resolve(), pathlib.Path(args.out), args.only)
    else:
        ok = compare(*(json.loads(pathlib.Path(f).read_text()) for f in (args.first, args.second)))
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
