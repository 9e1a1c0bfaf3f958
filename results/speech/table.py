"""Writes the accent table (WER per accent before/after, per method) from finished workdirs.

  python results/speech/table.py W_full W_lora ... > results/speech/table.md

Each workdir is a finished `configs/whisper_accent.py` run (summary.json + config.json).
"""

from __future__ import annotations

import json
import pathlib
import sys


def row(workdir: pathlib.Path) -> str:
    s = json.loads((workdir / "summary.json").read_text())
    c = json.loads((workdir / "config.json").read_text())
    before, after = s["before"], s
    cut = 1 - after["test"]["wer"] / before["test"]["wer"]
    forgetting = after["test_control"]["wer"] - before["test_control"]["wer"]
    minutes = s["train_time_s"] / 60
    return (f"| {s['method']} | {s['trainable_params']:,} ({100 * s['trainable_params'] / s['total_params']:.2f}%) "
            f"| {c['optimizer']['lr']:g} | {s['final_step']} ({s['best_step']}) "
            f"| {before['dev']['wer']:.3f} → {after['dev']['wer']:.3f} "
            f"| {before['test']['wer']:.3f} → **{after['test']['wer']:.3f}** ({100 * cut:.0f}% cut) "
            f"| {before['test']['cer']:.3f} → {after['test']['cer']:.3f} "
            f"| {before['test_control']['wer']:.3f} → {after['test_control']['wer']:.3f} ({forgetting:+.3f}) "
            f"| {minutes:.1f} |")


def main(paths: list[str]) -> None:
    first = json.loads((pathlib.Path(paths[0]) / "config.json").read_text())
    speech = first["data"]["speech"]
    print(f"Target accent `{speech['accent']}`, control `{speech['control_accent']}`; "
          f"window {first['data']['max_audio_seconds']:g} s for every score (zero-shot and fine-tuned); "
          f"greedy decoding (beams={first['generation']['beams']}); WER/CER on normalised text.\n")
    print("| method | trainable | lr | steps (best) | dev WER | test WER | test CER | control test WER (change) "
          "| train min |")
    print("|---|---:|---:|---:|---|---|---|---|---:|")
    for p in paths:
        print(row(pathlib.Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
