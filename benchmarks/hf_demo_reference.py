"""The HF PyTorch reference for the offline demo (results/demo/), at the demo's own settings.

  # 1. the demo's exact splits, read by ftjax's own data loading (the ftjax venv)
  python benchmarks/hf_demo_reference.py export --work=/tmp/hf_demo_reference
  # 2. the same fine-tune with transformers' Trainer (a venv with torch 2.x, transformers 5, accelerate)
  /work/venv-ref/bin/python benchmarks/hf_demo_reference.py train --work=/tmp/hf_demo_reference \
      [--out=results/demo/hf_reference] [--threads=0]

`export` opens the splits `python -m ftjax.main --config=configs/bert_sst2.py:demo` trains and
evaluates on (Rotten Tomatoes snippets split by movie: train 10,183 / dev 1,267 / test
1,358) and writes WORK/{train,dev,test}.jsonl (text, label, and the token count of ftjax's
tokenizer at the demo's max length) and WORK/settings.json (the model folder that
`asset:minilm` resolves to, and the demo config's training settings).

`train` fine-tunes that folder with those settings: mean pooling over the attention mask
(the demo's `model.pooling="mean"`; HF's BertForSequenceClassification would use the
[CLS] pooler) -> dropout 0.1 -> Linear(384, 2), batch 32, 2 epochs, AdamW lr 5e-5 (b1
0.9, b2 0.999, eps 1e-8), weight decay 0.01 (none on biases and LayerNorm), 10% warmup
then linear decay, global-norm clipping at 1, max length 64, dynamic padding
(DataCollatorWithPadding), length grouping (train_sampling_strategy="group_by_length",
transformers 5's name for group_by_length=True), dev evaluation and a checkpoint each
epoch, the best dev accuracy's checkpoint reloaded, then final dev and test metrics.
It prints a JSON summary and writes OUT/summary.json (and OUT/log_history.json).

Where HF cannot mirror ftjax exactly (see the summary's "differences"): HF pads each batch
to its longest row, ftjax to the next of its buckets (16, 24, 32, 40, 48, 64); HF groups
lengths in mega-batches of 50 batches sorted longest first, ftjax in chunks of 32 batches
whose batches it shuffles again; HF keeps the last partial batch of an epoch (319 steps),
ftjax drops it (318).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (benchmarks/peers.py: stdlib-only at import)

T0 = time.perf_counter()  # the wall clock starts before the heavy imports (torch, transformers)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SPLITS = ("train", "dev", "test")


# ---------------------------------------------------------------- step 1: export (ftjax venv)

def export(work: str) -> dict:
    """Writes the demo's splits and settings to `work`; returns the split sizes."""
    sys.path.insert(0, ROOT)
    from configs import bert_sst2
    from ftjax import assets
    from ftjax.data import pipeline, tfds_sources
    from ftjax.data import tokenizer as tok_lib

    config = bert_sst2.get_config("demo")
    sources = tfds_sources.load_sources(config)
    tokenizer = tok_lib.load_tokenizer(tok_lib.tokenizer_folder(config))
    (key,) = sources.text_keys
    os.makedirs(work, exist_ok=True)
    sizes = {}
    for split in SPLITS:
        source = sources.splits[split]
        records = [source[i] for i in range(len(source))]
        texts = [pipeline.to_str(r[key]) for r in records]
        encoded = tokenizer.encode(texts, None, config.data.max_length)
        with open(os.path.join(work, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": text, "label": int(r[sources.label_key]), "ftjax_tokens": len(ids)})
                         + "\n" for text, r, (ids, _) in zip(texts, records, encoded))
        sizes[split] = len(records)
    o, s = config.optimizer, config.schedule
    settings = {
        "config": "configs/bert_sst2.py:demo", "model_dir": str(assets.resolve_model_dir(config.model.pretrained)),
        "label_names": list(sources.label_names), "sizes": sizes, "seed": config.seed,
        "pooling": config.model.pooling, "dropout": config.model.dropout, "head_dropout": config.model.head_dropout,
        "max_length": config.data.max_length, "bucket_lengths": list(config.data.bucket_lengths),
        "group_by_length": config.data.group_by_length, "batch_size": config.batch_size,
        "eval_batch_size": config.eval_batch_size, "num_epochs": config.num_epochs, "optimizer": o.name,
        "lr": o.lr, "b1": o.b1, "b2": o.b2, "eps": o.eps, "weight_decay": o.weight_decay,
        "grad_clip_norm": o.grad_clip_norm, "decay": s.decay, "warmup_fraction": s.warmup_fraction,
        "warmup_steps": s.warmup_steps, "metric": config.metric}
    with open(os.path.join(work, "settings.json"), "w") as f:
        json.dump(settings, f, indent=1)
    return sizes


# ---------------------------------------------------------------- step 2: train (torch venv)

def _mean_pool_classifier():
    """BertModel (no pooler) -> masked mean over tokens -> dropout -> Linear: ftjax's pooling="mean"."""
    import torch
    from transformers import BertModel, BertPreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    class BertMeanPoolForSequenceClassification(BertPreTrainedModel):
        def __init__(self, config, head_dropout: float | None = None):
            super().__init__(config)
            self.num_labels = config.num_labels
            self.bert = BertModel(config, add_pooling_layer=False)
            p = config.hidden_dropout_prob if head_dropout is None else head_dropout
            self.dropout = torch.nn.Dropout(p)
            self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)  # normal(0.02), bias 0
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
            seq = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            **kwargs).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(seq.dtype)
            pooled = (seq * m).sum(1) / m.sum(1).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))
            loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return BertMeanPoolForSequenceClassification


def _metrics(logits, labels) -> dict:
    """accuracy, F1 of class 1 and MCC, as ftjax.evaluators.ClassificationMetrics."""
    import numpy as np

    pred = np.argmax(logits, -1)
    tp = float(((pred == 1) & (labels == 1)).sum())
    tn = float(((pred == 0) & (labels == 0)).sum())
    fp = float(((pred == 1) & (labels == 0)).sum())
    fn = float(((pred == 0) & (labels == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return {"accuracy": float((pred == labels).mean()), "f1": f1, "mcc": (tp * tn - fp * fn) / den if den else 0.0}


def train(work: str, out: str | None, threads: int, limit: int = 0) -> dict:
    import accelerate
    import numpy as np
    import tokenizers
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    if threads:
        torch.set_num_threads(threads)
    with open(os.path.join(work, "settings.json")) as f:
        st = json.load(f)
    if (st["pooling"], st["optimizer"], st["decay"]) != ("mean", "adamw", "linear"):
        sys.exit(f"{work}/settings.json: this reference mirrors mean pooling, AdamW and linear decay only")
    if st["dropout"] is not None:
        sys.exit(f"{work}/settings.json sets model.dropout; this reference keeps the checkpoint's dropout")
    tokenizer = AutoTokenizer.from_pretrained(st["model_dir"])
    data, mismatched = {}, 0
    for split in SPLITS:
        with open(os.path.join(work, f"{split}.jsonl")) as f:
            rows = [json.loads(line) for line in f][:limit or None]
        enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=st["max_length"])
        data[split] = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                        "token_type_ids": enc["token_type_ids"][i], "labels": r["label"]} for i, r in enumerate(rows)]
        mismatched += sum(len(x["input_ids"]) != r["ftjax_tokens"] for x, r in zip(data[split], rows))
    model = _mean_pool_classifier().from_pretrained(st["model_dir"], num_labels=len(st["label_names"]),
                                                    head_dropout=st["head_dropout"])

    clock = {"train_s": 0.0, "last": None, "real": 0, "padded": 0}

    class TrainClock(TrainerCallback):
        """Train time without evaluation and checkpoint saves (ftjax's train_time_s leaves them out too)."""

        def on_train_begin(self, args, state, control, **kw):
            clock["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            clock["train_s"] += now - clock["last"]
            clock["last"] = now

        def on_evaluate(self, args, state, control, **kw):
            clock["last"] = time.perf_counter()

        on_save = on_log = on_evaluate

    class Reference(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            m = inputs["attention_mask"]
            clock["real"] += int(m.sum())
            clock["padded"] += m.numel()
            return super().training_step(model, inputs, num_items_in_batch)

    trainer_dir = os.path.join(work, "trainer")
    shutil.rmtree(trainer_dir, ignore_errors=True)  # checkpoints of an earlier run
    warmup = st["warmup_steps"] if st["warmup_steps"] is not None else float(st["warmup_fraction"])
    args = TrainingArguments(
        output_dir=trainer_dir, seed=st["seed"], use_cpu=True,
        per_device_train_batch_size=st["batch_size"], per_device_eval_batch_size=st["eval_batch_size"],
        num_train_epochs=st["num_epochs"], learning_rate=st["lr"], adam_beta1=st["b1"], adam_beta2=st["b2"],
        adam_epsilon=st["eps"], weight_decay=st["weight_decay"], max_grad_norm=st["grad_clip_norm"],
        lr_scheduler_type="linear", warmup_steps=warmup, train_sampling_strategy="group_by_length",
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model=st["metric"], greater_is_better=True, logging_steps=20, report_to="none",
        dataloader_num_workers=0)
    trainer = Reference(model=model, args=args, train_dataset=data["train"], eval_dataset=data["dev"],
                        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                        compute_metrics=lambda p: _metrics(p.predictions, p.label_ids), callbacks=[TrainClock()])
    t_train = time.perf_counter()
    result = trainer.train()
    train_wall = time.perf_counter() - t_train
    final = {split: trainer.evaluate(data[split], metric_key_prefix=split) for split in ("dev", "test")}
    wall = time.perf_counter() - T0
    summary = {
        "command": " ".join(["python", "benchmarks/hf_demo_reference.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": peers._cpu_name(),
        "load_average_at_end": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": np.__version__},
        "torch_threads": torch.get_num_threads(), "settings": st, "limit": limit or None,
        "sizes": {k: len(v) for k, v in data.items()},
        "token_count_mismatches_vs_ftjax": mismatched,
        "steps": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint,
        **{split: {k[len(split) + 1:]: v for k, v in final[split].items() if k.startswith(split + "_")}
           for split in ("dev", "test")},
        "wall_s": wall, "train_call_s": train_wall, "train_time_s": clock["train_s"],
        "examples_per_s": len(data["train"]) * st["num_epochs"] / clock["train_s"],
        "trainer_train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "real_tokens": clock["real"], "padded_tokens": clock["padded"],
        "padded_tokens_per_s": clock["padded"] / clock["train_s"],
        "padding_ratio": clock["padded"] / max(clock["real"], 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "per_epoch_dev": [{k: v for k, v in e.items() if k.startswith("eval_")} for e in trainer.state.log_history
                          if "eval_accuracy" in e],
        "differences": [
            ("HF pads each batch to its longest row (DataCollatorWithPadding); ftjax pads to the next bucket "
             "(16, 24, 32, 40, 48, 64)"),
            ("HF groups lengths in mega-batches of 50 batches, sorted longest first (LengthGroupedSampler); "
             "ftjax sorts chunks of 32 shuffled batches and shuffles the batches again"),
            ("HF keeps each epoch's last partial batch (2 x 319 steps, 10,183 examples an epoch); ftjax drops "
             "it (2 x 318 steps)"),
            ("the mean-pooling head is a 20-line BertPreTrainedModel subclass here (HF's "
             "BertForSequenceClassification would use the [CLS] pooler)")],
    }
    print(json.dumps(summary, indent=1))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(out, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("export", "train"))
    parser.add_argument("--work", default="/tmp/hf_demo_reference", help="the exported splits and settings")
    parser.add_argument("--out", default=None, help="train: write summary.json here (e.g. results/demo/hf_reference)")
    parser.add_argument("--threads", type=int, default=0, help="train: torch threads; 0 = torch's default")
    parser.add_argument("--limit", type=int, default=0, help="train: first N rows of each split (smoke test)")
    a = parser.parse_args()
    if a.step == "export":
        print(json.dumps(export(a.work)))
    else:
        train(a.work, a.out, a.threads, a.limit)


if __name__ == "__main__":
    main()
