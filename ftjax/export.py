"""Export a fine-tuned run as an HF folder: python -m ftjax.export --workdir=W --out=DIR.

Writes config.json (BertForSequenceClassification, with the run's labels),
model.safetensors and the tokenizer files, which transformers'
AutoModelForSequenceClassification loads (PyTorch). LoRA and IA3 runs are already
merged into plain weights in W/export. Adapters, prompts and prefixes add parts a plain
BERT does not have, and mean / raw-[CLS] pooling differs from BERT's pooler head: those
runs are refused with the reason, since the HF model would compute something else.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from ftjax import cli  # noqa: E402
from ftjax.errors import UserError  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's workdir (or its export/ folder).")
_OUT = flags.DEFINE_string("out", None, "The HF folder to write.")


def export_hf(workdir: str, out: str) -> pathlib.Path:
    """Writes the HF folder for `workdir`'s export and returns its path."""
    from safetensors.numpy import save_file

    from ftjax import checkpoint as ckpt_lib
    from ftjax import tree as tree_lib
    from ftjax.convert import bert as bert_map

    params, meta = ckpt_lib.load_export(workdir)
    if meta.get("method"):
        raise UserError(f"a {meta['method']} run keeps parameters a plain HF BERT does not have, so it "
                        "cannot be merged: use ftjax.predict, or fine-tune with a mergeable method "
                        "(full, freeze, bitfit, lora, ia3, ...)")
    if meta["family"] != "bert":
        raise UserError(f"HF export supports BERT models, not {meta['family']!r}")
    if meta["pooling"] != "pooler":
        raise UserError(f"this run pools with {meta['pooling']!r}; HF's BertForSequenceClassification "
                        "classifies the [CLS] pooler output, so its logits would differ: fine-tune with "
                        "--config.model.pooling=pooler to export")
    src = pathlib.Path(workdir)
    src = src / "export" if (src / "export").is_dir() else src
    dst = pathlib.Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    labels = list(meta["label_names"])
    hf = dict(meta["hf_config"])
    hf.update({
        "architectures": ["BertForSequenceClassification"], "model_type": "bert",
        "num_labels": meta["num_labels"],
        "problem_type": "regression" if meta["num_labels"] == 1 else "single_label_classification",
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
    })
    tensors = bert_map.to_hf(tree_lib.flatten(params))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for f in (src / "tokenizer").iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    with cli.user_errors():
        print(export_hf(_WORKDIR.value, _OUT.value))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    sys.exit(app.run(main))
