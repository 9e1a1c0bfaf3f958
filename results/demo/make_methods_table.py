"""Builds results/demo/methods.md from the runs of results/demo/run_methods.sh.

  python results/demo/make_methods_table.py RUNS_DIR > results/demo/methods.md

Each RUNS_DIR/<method>/ holds a finished run's summary.json (and wall_s.txt, the wall
clock of the command). Methods without a finished run are listed as not run.
"""

import json
import pathlib
import sys

ORDER = ("full", "linear_probe", "freeze", "gradual_unfreezing", "bitfit", "layernorm", "lora", "ia3", "adapter", "prompt",
         "prefix")


def main(runs: pathlib.Path) -> str:
    lines = [
        "# Fine-tuning methods on the offline demo",
        "",
        "`bash results/demo/run_methods.sh` runs `configs/bert_sst2.py:demo,method=NAME` for each",
        "method (all-MiniLM-L6-v2, Rotten Tomatoes by-movie split, 2 epochs, batch 32, each",
        "method's usual learning rate from `METHOD_LR` in the config) on a 2-core CPU, and this",
        "table is made from the runs' `summary.json` by `make_methods_table.py`. Dev and test",
        "metrics come from the best checkpoint by dev accuracy. Times are noisy: `full` ran",
        "alone, the other runs shared the 2 cores with other jobs, so their wall clocks are upper",
        "bounds; `benchmarks/methods.py` measures throughput ratios side by side.",
        "",
        "| method | trainable params | trainable % | dev acc | test acc | wall clock | train examples/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    missing = []
    for method in ORDER:
        path = runs / method / "summary.json"
        if not path.exists():
            missing.append(method)
            continue
        s = json.loads(path.read_text())
        wall = runs / method / "wall_s.txt"
        wall_s = f"{int(wall.read_text()) / 60:.1f} min" if wall.exists() else "n/a"
        pct = 100.0 * s["trainable_params"] / s["total_params"]
        lines.append(f"| {method} | {s['trainable_params']:,} | {pct:.2f}% | {s['dev']['accuracy']:.3f} | "
                     f"{s['test']['accuracy']:.3f} | {wall_s} | {s['examples_per_s']:.1f} |")
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ftjax_methods")))
