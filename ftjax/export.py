"""The end of a run (final evaluation, params-only export, summary) and the HF export.

  python -m ftjax.export --workdir=W --out=DIR [--format=auto|hf|sentence_transformers]

writes a finished run as a folder a standard PyTorch library loads with the same outputs:
  * hf: for a family with an HF export (FamilySpec `hf_export`; BERT:
    BertForSequenceClassification): config.json with the run's labels, model.safetensors
    and the tokenizer files, which transformers' AutoModelForSequenceClassification loads.
    A family refuses what its HF classifier cannot reproduce (BERT: mean or raw-[CLS]
    pooling).
  * sentence_transformers: for text runs pooled with "mean" or "cls", from any family
    whose converter has `to_hf`: the encoder (config.json, model.safetensors, tokenizer,
    sentence_bert_config.json) -> 1_Pooling -> 2_Dense (the head, identity activation),
    listed in modules.json; labels.json names the classes. `SentenceTransformer(DIR)
    .encode(texts)` returns the logits.
  * auto (the default): sentence_transformers for mean/cls-pooled runs, else hf.
LoRA and IA3 runs are already merged into plain weights in W/export. Adapters, prompts
and prefixes add parts a plain model does not have: those runs are refused with the
reason, since the exported model would compute something else.
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

# Every tokenizer format the families use: WordPiece vocab.txt, BPE vocab.json + merges.txt,
# SentencePiece models, and the fast tokenizer.json that covers them all.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spm.model", "sentencepiece.bpe.model",
                   "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")


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
    best = run.checkpointer.restore_best(step_lib.abstract(ckpt_lib.best_tree(run.state_shapes), run.replicated))
    best_step = run.checkpointer.best_step()
    if best is None:
        best, best_step = ckpt_lib.best_tree(state), final_step
    variables = step_lib.variables_of(best["params"], best["model_state"])
    train_time = loop.train_time_s
    summary: dict[str, Any] = {
        "final_step": final_step, "best_step": best_step, "total_params": run.total_params,
        "trainable_params": run.trainable_params, "start": start_from,
        "dev": train.evaluate(run, variables, "dev", tag="final"),
        "test": train.evaluate(run, variables, "test", tag="final") if run.data.has_split("test") else None,
        **{split: train.evaluate(run, variables, split, tag="final") for split in train.eval_splits(run)
           if split not in ("dev", "test")},
        "train_time_s": train_time,
        "examples_per_s": loop.examples_seen / train_time if train_time else None,
        "tokens_per_s": loop.tokens_seen / train_time if train_time and loop.tokens_seen else None,
        "stopped_early": loop.stopped_early, "num_devices": run.mesh.size, "compile_s": compile_s,
        "skipped_steps": loop.skipped_steps, "method": run.config.method,
        # the optimizer state's bytes over all devices (what a method saves besides gradients)
        "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state))),
        "peak_rss_mb": _peak_rss_mb(), **run.task.summary(),
    }
    if loop.before is not None:
        summary["before"] = loop.before
    is_main = jax.process_index() == 0
    if run.config.export:
        summary["export"] = (write_export(run, best["params"], best["model_state"], best_step) if is_main
                             else str(run.workdir / "export"))
    writer.write(final_step, {f"final_dev/{k}": v for k, v in summary["dev"].items()})
    if is_main:
        (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run.workdir / "config.json").write_text(run.config.to_json_best_effort(indent=2) + "\n")
    return summary


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


FORMATS = ("auto", "hf", "sentence_transformers")
# Poolings a sentence-transformers Pooling module computes as ftjax does (the pooler needs HF's head).
ST_POOLINGS = ("mean", "cls")
_ST_MODULES = (  # (folder, class): the names sentence-transformers 2.x-6.x resolve
    ("", "sentence_transformers.models.Transformer"),
    ("1_Pooling", "sentence_transformers.models.Pooling"),
    ("2_Dense", "sentence_transformers.models.Dense"),
)
# config.json keys of HF's classifiers; the encoder-only config of a sentence-transformers root drops them
_CLASSIFIER_KEYS = ("architectures", "num_labels", "id2label", "label2id", "problem_type")


def export_hf(workdir: str, out: str, fmt: str = "hf") -> pathlib.Path:
    """Writes `workdir`'s export as an HF or sentence-transformers folder.

    Args:
      workdir: a finished run's workdir, or its export/ folder.
      out: the folder to write.
      fmt: "hf" (<Family>ForSequenceClassification; the default, as before --format
        existed), "sentence_transformers" (Transformer -> Pooling -> Dense; `encode(texts)`
        returns the logits) or "auto" (the CLI's default): sentence_transformers for runs
        pooled with "mean" or "cls", else hf.

    Returns:
      The folder written.
    """
    from ftjax import checkpoint as ckpt_lib
    from ftjax import models

    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
    params, meta = ckpt_lib.load_export(workdir)
    if meta.get("method"):
        raise UserError(f"a {meta['method']} run keeps parameters a plain HF model does not have, so it "
                        "cannot be merged: use ftjax.predict, or fine-tune with a mergeable method "
                        "(full, freeze, bitfit, lora, ia3, ...)")
    family = models.family(meta["family"])
    mapping = family.converter_module()
    if not hasattr(mapping, "to_hf"):
        raise UserError(f"the {meta['family']} family has no HF export")
    pooling = meta.get("pooling", "pooler")
    if fmt == "auto":
        fmt = "sentence_transformers" if pooling in ST_POOLINGS else "hf"
    src = pathlib.Path(workdir)
    src = src / "export" if (src / "export").is_dir() else src
    if fmt == "hf":
        return _write_hf(family, mapping, params, {**meta, "export_dir": str(src)}, src, pathlib.Path(out))
    if meta.get("task", "classification") not in ("classification", "regression"):
        raise UserError(f"a sentence-transformers export computes a classifier, not a {meta['task']!r} model")
    return _write_sentence_transformers(family, mapping, params, meta, src, pathlib.Path(out))


def _write_hf(family, mapping, params, meta: dict, src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The HF folder: config.json (+ the task's files: a classifier's labels), weights, tokenizer."""
    from safetensors.numpy import save_file

    from ftjax import tasks
    from ftjax import tree as tree_lib

    if family.hf_export is None:
        raise UserError(f"the {meta['family']} family has no HF classifier export"
                        + (": use --format=sentence_transformers" if _fits_st(family, meta) else ""))
    try:
        family.hf_export.check(meta)
    except UserError as e:
        if _fits_st(family, meta):
            raise UserError(f"{e}; or export it as a sentence-transformers folder: "
                            "--format=sentence_transformers") from None
        raise
    files = tasks.get(meta.get("task") or "classification").hf_files(meta)
    dst.mkdir(parents=True, exist_ok=True)
    hf = dict(meta["model_config"])
    hf.update({"architectures": [family.hf_export.architecture], "model_type": family.hf_export.model_type,
               **files.pop("config.json", {})})
    tensors = mapping.to_hf(tree_lib.flatten(params))
    if hasattr(mapping, "to_hf_state"):  # tensors the model keeps outside its params (Whisper's positions)
        from ftjax import checkpoint as ckpt_lib

        tensors.update(mapping.to_hf_state(tree_lib.flatten(ckpt_lib.load_export_model_state(src))))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name, content in files.items():
        (dst / name).write_text(json.dumps(content, indent=2) + "\n")
    _copy_tokenizer(src, dst)
    return dst


def _fits_st(family, meta: dict) -> bool:
    """Whether a sentence-transformers folder computes what the run does."""
    return family.modality == "text" and meta.get("pooling") in ST_POOLINGS


def _encoder_tensors(family, mapping, flat: dict[str, Any]) -> dict[str, Any]:
    """The HF tensors of the encoder alone: the head's params ("head/...") never reach `to_hf`.

    Reads them back through the family's `convert` and refuses a folder that would not
    hold exactly the run's encoder (a `to_hf` that adds or drops tensors).
    """
    import numpy as np

    encoder = {k: v for k, v in flat.items() if not k.startswith("head/")}
    tensors = mapping.to_hf(encoder)
    back = mapping.convert(tensors)
    want = {"params/" + k for k in encoder}
    wrong = sorted(set(back) ^ want) + sorted(k for k in want & set(back)
                                              if np.shape(back[k]) != np.shape(encoder[k[len("params/"):]]))
    if wrong:
        raise UserError(f"the {family.name} converter's to_hf does not give back the run's encoder "
                        f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}): its "
                        "sentence-transformers export would compute something else")
    return tensors


def _write_sentence_transformers(family, mapping, params, meta: dict, src: pathlib.Path,
                                 dst: pathlib.Path) -> pathlib.Path:
    """Transformer (the encoder, in the root) -> Pooling (mean or cls) -> Dense (the head).

    `SentenceTransformer(dst).encode(texts)` returns the run's logits (regression: its
    one output); labels.json names the classes.
    """
    import numpy as np
    from safetensors.numpy import save_file

    from ftjax import tree as tree_lib

    pooling = meta.get("pooling", "pooler")
    if family.modality != "text":
        raise UserError(f"a sentence-transformers folder encodes texts; the {family.name} family takes "
                        f"{family.modality}: use --format=hf")
    if pooling not in ST_POOLINGS:
        raise UserError(f"this run pools with {pooling!r}; a sentence-transformers Pooling module computes "
                        f"{' or '.join(map(repr, ST_POOLINGS))} only: use --format=hf (or auto)")
    if not (src / "tokenizer").is_dir():
        raise UserError(f"{src} has no tokenizer/ folder, which a sentence-transformers folder needs: "
                        "export the run again")
    model_type = (meta["model_config"].get("model_type")
                  or (family.hf_export.model_type if family.hf_export else None)
                  or next(iter(family.model_types), None))
    if not model_type:
        raise UserError(f"the {family.name} family names no config.json model_type, which "
                        "transformers' AutoModel needs")
    flat = tree_lib.flatten(params)
    if {k for k in flat if k.startswith("head/")} != {"head/kernel", "head/bias"}:
        raise UserError(f"the export at {src} has no Dense head (head/kernel, head/bias)")
    kernel = np.asarray(flat["head/kernel"], np.float32)
    bias = np.asarray(flat["head/bias"], np.float32)
    hidden, outputs = kernel.shape
    tensors = _encoder_tensors(family, mapping, flat)

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "1_Pooling").mkdir(exist_ok=True)
    (dst / "2_Dense").mkdir(exist_ok=True)
    config = {k: v for k, v in meta["model_config"].items() if k not in _CLASSIFIER_KEYS}
    config["model_type"] = model_type
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    _write_json(dst / "config.json", config)
    _copy_tokenizer(src, dst)
    # do_lower_case False: the tokenizer lowercases (or not) as it did for ftjax
    _write_json(dst / "sentence_bert_config.json", {"max_seq_length": int(meta["max_length"]),
                                                    "do_lower_case": False})
    # The pooling_mode_* keys: what every sentence-transformers release reads (6.x maps them).
    _write_json(dst / "1_Pooling" / "config.json", {
        "word_embedding_dimension": int(hidden), "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True})
    _write_json(dst / "2_Dense" / "config.json", {
        "in_features": int(hidden), "out_features": int(outputs), "bias": True,
        "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({"linear.weight": np.ascontiguousarray(kernel.T), "linear.bias": bias},
              str(dst / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    _write_json(dst / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": cls}
                                       for i, (path, cls) in enumerate(_ST_MODULES)])
    _write_json(dst / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None})
    # text_keys: two for sentence pairs, which encode() takes as (text, pair) tuples
    _write_json(dst / "labels.json", {"task": meta.get("task", "classification"),
                                      "label_names": list(meta["label_names"]),
                                      "text_keys": list(meta.get("text_keys", ["text"]))})
    return dst


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    if (src / "tokenizer").is_dir():
        for f in (src / "tokenizer").iterdir():
            shutil.copy(f, dst / f.name)


def main() -> None:
    # Flags are defined here, not at import: ftjax.train imports this module beside
    # ftjax.main's own --workdir flag.
    from absl import app, flags, logging

    from ftjax import cli

    workdir = flags.DEFINE_string("workdir", None, "A finished run's workdir (or its export/ folder).")
    out = flags.DEFINE_string("out", None, "The folder to write.")
    fmt = flags.DEFINE_string("format", "auto", "hf: an HF <Family>ForSequenceClassification folder; "
                              "sentence_transformers: Transformer -> Pooling -> Dense, whose encode() gives the "
                              "logits; auto: sentence_transformers for mean/cls-pooled runs, else hf.")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)
        with cli.user_errors():
            print(export_hf(workdir.value, out.value, fmt.value))

    app.run(run)


if __name__ == "__main__":
    sys.exit(main())
