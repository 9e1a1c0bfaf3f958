"""Tasks: what is predicted and how it is scored, as plug-ins of the one trainer.

`config.task` names a module below ("classification", "regression") or the dotted path
of a module of your own; the module exports `TASK`, a `Task` subclass. None (the
default) infers it from the data: regression when the labels are numbers, else
classification. The trainer (ftjax/train.py) and the steps (ftjax/step.py) never ask
which task runs; everything task-specific goes through the methods below.

A task owns
  * its data: `load_data(config, family, process_index, process_count)` returns the
    split data (`ftjax.data.pipeline.SplitData`: `train_batches(start_step)`,
    `eval_batches(split)`, `steps_per_epoch`, `has_split`, `tokenizer`, `export_meta()`);
  * the model it wraps around the family's encoder (a head, or a decoder):
    `build_model(family_name, model_config, options)` (the family's registry name, its config
    dict, `models.EncoderOptions`), a Linen module with `input_keys`
    (the batch keys it is called with, in order) and `dummy_inputs()` (for init);
  * the train loss and metrics: `loss(outputs, batch) -> (scalar loss, {name: scalar})`,
    from the model's train-mode outputs and the batch (gradient accumulation averages
    both over micro-batches);
  * the eval prediction, on device: `predict(model, variables, batch)` -> a pytree of
    [B, ...] arrays (classification: logits); it gets the batch keys `predict_keys`
    (default: the model's `input_keys`; a decoder decodes without the teacher-forced ones);
  * its evaluators (big_vision style): `evaluators()` -> objects with
    `update(predictions, rows)` and `result() -> {name: value}`; `predictions` are the
    host copies of `predict`'s output and `rows` the batch keys `eval_keys` plus "mask"
    (1 for real rows, 0 for padding), gathered over processes. The dev metric for
    best-k and early stopping (`config.metric`) may be any name they return;
    `metric_names()` lists those names, so a wrong config.metric is refused before training;
  * what a run records: `export_meta()` (into export/meta.json, read back by
    `from_meta`), `fingerprint()` (what a checkpoint must match), `summary()`;
  * how `ftjax.inference.Predictor` renders its predictions: `render(predictions)`;
  * optionally, its model in two halves for cached features (`method_args.cache_features`,
    ftjax/feature_cache.py): `caches_features = True`, `features(model, variables, batch)`
    (the head's input, eval mode) and `head(model, variables, features, train=, rng=)`
    (train: what `loss` takes; eval: what `predict` returns for those rows).

A sequence-to-sequence task (speech recognition, summarisation) fits the same seams
without touching train.py or step.py; tests/toy_seq2seq.py is a working one:

    class Seq2Seq(Task):
        eval_keys = ("labels", "label_mask")       # reference token ids, their mask
        def build_model(self, family_name, model_config, options):
            # encoder + decoder (the family's), called as
            # model(*encoder_inputs, decoder_input_ids, train=...) -> logits [B, T, V]
        def loss(self, logits, batch):
            # teacher forcing: decoder_input_ids = labels shifted right (BOS first);
            # token cross-entropy weighted by label_mask, mean over real tokens
        def predict(self, model, variables, batch):
            # autoregressive decoding on device: lax.while_loop / scan over positions
            # with a KV cache (greedy, or beam search with length penalty), stopping
            # at EOS; returns {"tokens": int32 [B, max_decode_length]}
        def evaluators(self):
            # host side: detokenize predictions and references (the tokenizer comes
            # with the data), then WER / CER / exact match / ROUGE over the split
        def render(self, predictions):
            # the decoded text of each row

Variable-length label sequences are padded per batch (bucketed like text inputs) with
`label_mask` 0 on padding; the loss and metrics never see padding tokens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp

from ftjax import plugins
from ftjax.errors import UserError

# The registry: task name -> module exporting TASK.
TASKS = {
    "classification": "ftjax.tasks.classification",
    "regression": "ftjax.tasks.regression",
    "speech_recognition": "ftjax.tasks.speech",
    "causal_lm": "ftjax.tasks.causal_lm",
}


def token_losses(logits, labels):
    """Per-token cross-entropy (float32) of sequence logits [B, T, V] against int labels [B, T]."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def masked_token_loss(logits, batch: dict):
    """A sequence task's train loss: the mean token cross-entropy over `label_mask`, and its
    token accuracy (the decoders of speech_recognition and causal_lm)."""
    weights = batch["label_mask"].astype(jnp.float32)
    hits = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    n = jnp.maximum(weights.sum(), 1.0)
    return (token_losses(logits, batch["labels"]) * weights).sum() / n, {"token_accuracy": (hits * weights).sum() / n}


def apply(model, variables, batch: dict, *, train: bool, rng=None, mutable=False):
    """Calls `model` on the batch keys it takes (`model.input_keys`, in order)."""
    rngs = {"dropout": rng} if train else {}
    return model.apply(variables, *(batch[k] for k in model.input_keys), train=train, rngs=rngs,
                       mutable=mutable)


class Task:
    """The interface every task implements (see the module docstring)."""

    name: ClassVar[str]
    eval_keys: ClassVar[tuple[str, ...]] = ()
    predict_keys: ClassVar[tuple[str, ...] | None] = None  # None: the model's input_keys

    @classmethod
    def load_data(cls, config, family, process_index: int, process_count: int):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config, data) -> "Task":
        raise NotImplementedError

    @classmethod
    def from_meta(cls, meta: dict) -> "Task":
        raise NotImplementedError

    def build_model(self, family_name: str, model_config: dict, options):
        raise NotImplementedError

    def loss(self, outputs, batch: dict) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def predict(self, model, variables, batch: dict):
        """Default: the model's eval-mode outputs as float32."""
        return apply(model, variables, batch, train=False).astype(jnp.float32)

    def evaluators(self) -> list:
        raise NotImplementedError

    # Cached features (method_args.cache_features, ftjax/feature_cache.py): a task whose model is
    # a frozen feature extractor under a trained head says so and splits its model in two.
    caches_features: ClassVar[bool] = False

    def features(self, model, variables, batch: dict):
        """The head's input of every row of `batch` (float32 [B, ...]), computed in eval mode."""
        raise NotImplementedError

    def head(self, model, variables, features, *, train: bool, rng=None):
        """The model's outputs from `features` alone: with `train`, what `loss` takes (dropout
        from `rng`); without, what `predict` returns for the rows the features came from."""
        raise NotImplementedError

    @classmethod
    def metric_names(cls) -> tuple[str, ...] | None:
        """The names `evaluators()` return, known before any data is read: `config.metric`
        is checked against them before the first step. None (the default): not declared,
        and config.metric is checked at the first evaluation."""
        return None

    def export_meta(self) -> dict[str, Any]:
        return {}

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

    def render(self, predictions) -> list:
        raise NotImplementedError

    # Inference from raw inputs (ftjax.inference.Predictor): the default reads inputs by the
    # family's modality and runs `predict`; a task with its own prompt format (causal_lm)
    # returns its batch from `raw_batch` and runs `infer` on the batch keys `infer_keys`.
    infer_keys: ClassVar[tuple[str, ...] | None] = None

    def raw_batch(self, inputs) -> dict | None:
        """The batch of raw inputs, or None: read them by modality (tokenize / decode)."""
        del inputs
        return None

    def infer(self, model, variables, batch):
        """What Predictor runs on device; the default is `predict`."""
        return self.predict(model, variables, batch)

    @classmethod
    def hf_files(cls, meta: dict) -> dict[str, dict]:
        """What an HF export of this task writes besides the weights: file name -> JSON;
        "config.json" holds the keys added to the model's config (the labels of a
        classifier). The default: the task has no HF form."""
        raise UserError(f"HF export has no form for {meta.get('task')!r} models")


def get(name: str) -> type[Task]:
    """The Task class of a registered task name, or of a module path exporting TASK."""
    return plugins.load(name, TASKS, "TASK", Task, "config.task")


def metric_names(config) -> tuple[str, ...] | None:
    """The dev metrics `config.metric` may name, known before any data is read: the named
    task's; with config.task unset (the labels decide), those of either inferred task.
    None: the task does not declare them."""
    if config.task is not None:
        return get(config.task).metric_names()
    return get("classification").metric_names() + get("regression").metric_names()


def create(config, family, process_index: int = 0, process_count: int = 1):
    """(task, data) for a config: the named task, or the one its data implies.

    Args:
      config: the experiment config.
      family: the model's FamilySpec.
      process_index: this process.
      process_count: all processes.

    Returns:
      The Task instance and its split data.
    """
    name = config.task
    if name is None:
        # classification and regression read the same labelled data; its label type decides
        from ftjax.tasks import classification

        data = classification.load_labelled_data(config, family, process_index, process_count)
        cls = get("regression" if data.regression else "classification")
    else:
        cls = get(name)
        data = cls.load_data(config, family, process_index, process_count)
    return cls.from_config(config, data), data


def from_meta(meta: dict) -> Task:
    """The task of an export's meta.json (exports older than tasks: by their label count)."""
    name = meta.get("task") or ("regression" if meta.get("num_labels") == 1 else "classification")
    return get(name).from_meta(meta)
