"""results/generation/: the headline demo's numbers and samples, from its workdir.

  python results/generation/make_results.py W [--show]

Writes results/generation/demo/{summary.json,metrics.jsonl} and prints the Markdown
of results/generation/README.md's tables. The BBC articles and their headlines are BBC
copyright (released for research), so nothing of them is written here: a sample is
named by its article id ("tech/123") with the generated headlines and their ROUGE-L
against the reference. `--show` prints the references beside them on this machine.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).resolve().parent


def _article_ids(config: dict, indices: list[int]) -> dict[int, str]:
    """Dev-split index -> article id, read from the run's prepared bbc_news data."""
    import ml_collections

    from ftjax.data import tfds_sources

    c = ml_collections.ConfigDict(config)
    sources = tfds_sources.load_sources(c, labels=False)
    dev = sources.splits["dev"]
    out = {}
    for i in indices:
        value = dev[i]["id"]
        out[i] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def main(argv: list[str]) -> int:
    from rouge_score import rouge_scorer

    work = pathlib.Path(argv[1])
    show = "--show" in argv
    summary = json.loads((work / "summary.json").read_text())
    config = json.loads((work / "config.json").read_text())
    before = json.loads((work / "samples" / "dev_before.json").read_text())
    after = json.loads((work / "samples" / "dev_final.json").read_text())
    out = HERE / "demo"
    out.mkdir(exist_ok=True)
    shutil.copy(work / "summary.json", out / "summary.json")
    shutil.copy(work / "metrics.jsonl", out / "metrics.jsonl")

    rows = []
    for split in ("dev", "test"):
        b, a = summary["before"][split], summary[split]
        for m in ("rougeL", "rouge1", "rouge2", "exact_match", "perplexity", "gen_tokens"):
            scale = 100 if m.startswith("rouge") or m == "exact_match" else 1
            rows.append(f"| {split} | {m} | {b[m] * scale:.2f} | {a[m] * scale:.2f} | {(a[m] - b[m]) * scale:+.2f} |")
    print("| split | metric | zero-shot | fine-tuned | change |\n|---|---|---:|---:|---:|")
    print("\n".join(rows))
    print()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    ids = _article_ids(config, [s["index"] for s in after])
    zero = {s["index"]: s for s in before}
    print("| article | zero-shot | ROUGE-L | fine-tuned | ROUGE-L |\n|---|---|---:|---|---:|")
    for s in after:
        z = zero[s["index"]]
        rz = scorer.score(s["reference"], z["generated"])["rougeL"].fmeasure
        rf = scorer.score(s["reference"], s["generated"])["rougeL"].fmeasure
        print(f"| {ids[s['index']]} | {z['generated']} | {100 * rz:.1f} | {s['generated']} | {100 * rf:.1f} |")
        if show:
            print(f"|   reference: {s['reference']} | | | | |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
