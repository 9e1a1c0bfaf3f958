"""The end of a run (final evaluation, params-only export, summary) and the HF export.

  python -m ftjax.export --workdir=W --out=DIR

writes an HF folder for a finished run whose family has an HF export (FamilySpec
`hf_export`; BERT: BertForSequenceClassification): config.json with the run's labels,
model.safetensors and the tokenizer files, which transformers'
AutoModelForSequenceClassification loads (PyTorch). LoRA and IA3 runs are already
merged into plain weights in W/export. Adapters, prompts and prefixes add parts a plain
model does not have, and a family may refuse what it cannot reproduce (BERT: mean or
raw-[CLS] pooling): those runs are refused with the reason, since the HF model would
compute something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ftjax.errors import UserError  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def export_meta(run, best_step: int) -> dict[str, Any]:
    """meta.json of a run's export: the family, its config, the task's and the data's meta."""
    return {"family": run.family_name, "model_config": run.model_config, **run.task.export_meta(),
            "step": best_step, **run.data.export_meta()}


def write_export(run, params, model_state, best_step: int) -> str:
    """Writes W/export (process 0): merged params where the method merges, meta, tokenizer."""
    import jax

    from ftjax import checkpoint as ckpt_lib
    from ftjax import methods

    export_dir = run.workdir / "export"
    meta = export_meta(run, best_step)
    params = jax.device_get(params)
    peft = methods.peft(run.config)
    merged = methods.merged_for_export(run.config, params, peft)
    if merged is None:  # adapters, prompts, prefixes: the export keeps them
        merged = params
        meta["method"] = run.config.method
        meta["peft"] = dataclasses.asdict(peft)
    ckpt_lib.export_params(export_dir, merged, meta, model_state=jax.device_get(model_state))
    tok_dir = run.data.tokenizer_dir
    if tok_dir is not None:
        tok_out = export_dir / "tokenizer"
        tok_out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).exists():
                (tok_dir / name).copy(tok_out / name, overwrite=True)
    return str(export_dir)


def finish(run, state, loop, *, start_from: str, compile_s: float | None, writer) -> dict[str, Any]:
    """Final dev/test evaluation from the best checkpoint, the export and W/summary.json.

    Args:
      run: the train.Run.
      state: the last train state.
      loop: the train.LoopState.
      start_from: where the run started (for the summary).
      compile_s: this process's first-step compile time.
      writer: the run's MetricWriter (gets the final dev metrics).

    Returns:
      The summary dict.
    """
    import jax

    from ftjax import checkpoint as ckpt_lib
    from ftjax import step as step_lib
    from ftjax import train

    final_step = int(state.step)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=run.replicated),
                            ckpt_lib.best_tree(run.state_shapes))
    best = run.checkpointer.restore_best(abstract)
    best_step = run.checkpointer.best_step()
    if best is None:
        best, best_step = ckpt_lib.best_tree(state), final_step
    variables = step_lib.variables_of(best["params"], best["model_state"])
    train_time = loop.train_time_s
    summary: dict[str, Any] = {
        "final_step": final_step, "best_step": best_step, "total_params": run.total_params,
        "trainable_params": run.trainable_params, "start": start_from,
        "dev": train.evaluate(run, variables, "dev"),
        "test": train.evaluate(run, variables, "test") if run.data.has_split("test") else None,
        "train_time_s": train_time,
        "examples_per_s": loop.examples_seen / train_time if train_time else None,
        "tokens_per_s": loop.tokens_seen / train_time if train_time and loop.tokens_seen else None,
        "stopped_early": loop.stopped_early, "num_devices": run.mesh.size, "compile_s": compile_s,
        "skipped_steps": loop.skipped_steps, "method": run.config.method, **run.task.summary(),
    }
    is_main = jax.process_index() == 0
    if run.config.export:
        summary["export"] = (write_export(run, best["params"], best["model_state"], best_step) if is_main
                             else str(run.workdir / "export"))
    writer.write(final_step, {f"final_dev/{k}": v for k, v in summary["dev"].items()})
    if is_main:
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run.workdir / "config.json").write_text(run.config.to_json_best_effort(indent=2) + "\n")
    return summary


def export_hf(workdir: str, out: str) -> pathlib.Path:
    """Writes the HF folder for `workdir`'s export and returns its path."""
    from safetensors.numpy import save_file

    from ftjax import checkpoint as ckpt_lib
    from ftjax import models
    from ftjax import tree as tree_lib

    params, meta = ckpt_lib.load_export(workdir)
    if meta.get("method"):
        raise UserError(f"a {meta['method']} run keeps parameters a plain HF model does not have, so it "
                        "cannot be merged: use ftjax.predict, or fine-tune with a mergeable method "
                        "(full, freeze, bitfit, lora, ia3, ...)")
    family = models.family(meta["family"])
    mapping = family.converter_module()
    if family.hf_export is None or not hasattr(mapping, "to_hf"):
        raise UserError(f"the {meta['family']} family has no HF export")
    if meta.get("task", "classification") not in ("classification", "regression"):
        raise UserError(f"HF export writes classifiers, not {meta['task']!r} models")
    family.hf_export.check(meta)
    src = pathlib.Path(workdir)
    src = src / "export" if (src / "export").is_dir() else src
    dst = pathlib.Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    labels = list(meta["label_names"])
    hf = dict(meta["model_config"])
    hf.update({
        "architectures": [family.hf_export.architecture], "model_type": family.hf_export.model_type,
        "num_labels": meta["num_labels"],
        "problem_type": "regression" if meta["num_labels"] == 1 else "single_label_classification",
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
    })
    tensors = mapping.to_hf(tree_lib.flatten(params))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if (src / "tokenizer").is_dir():
        for f in (src / "tokenizer").iterdir():
            shutil.copy(f, dst / f.name)
    return dst


def main() -> None:
    # Flags are defined here, not at import: ftjax.train imports this module beside
    # ftjax.main's own --workdir flag.
    from absl import app, flags, logging

    from ftjax import cli

    workdir = flags.DEFINE_string("workdir", None, "A finished run's workdir (or its export/ folder).")
    out = flags.DEFINE_string("out", None, "The HF folder to write.")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)
        with cli.user_errors():
            print(export_hf(workdir.value, out.value))

    app.run(run)


if __name__ == "__main__":
    sys.exit(main())
