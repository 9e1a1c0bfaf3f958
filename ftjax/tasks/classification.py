"""Classification: one class per example, from a head on the encoder's pooled output.

Text encoders: pooled vector (the encoder's pooler, the raw [CLS] token or the masked
mean) -> dropout -> Dense(num_labels) named "head". Image encoders: their feature
vector -> dropout -> a zero-initialised Dense head (as big_vision and vit_jax fine-tune).
Loss: softmax cross-entropy; train metric: accuracy; dev/test: accuracy, F1, MCC,
cross-entropy (ftjax.evaluators.ClassificationMetrics).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import evaluators
from ftjax.errors import UserError
from ftjax.models import EncoderOptions, FamilySpec
from ftjax.models.layers import Dropout, Peft
from ftjax.tasks import Task

POOLINGS = ("pooler", "cls", "mean")
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _encoder(family: str, encoder_config: Any, options: EncoderOptions) -> nn.Module:
    from ftjax import models

    spec = models.family(family)
    return spec.encoder(encoder_config, options, spec.name)


class SequenceClassifier(nn.Module):
    """text encoder -> pooled vector -> dropout -> Dense(num_labels) named "head".

    Attributes:
      family: the encoder's family (registry name); its params live under the
        family's name ("bert/...").
      encoder_config: the encoder's config (e.g. bert.BertConfig).
      num_labels: outputs (classes; 1 for regression).
      dropout: overrides the encoder's hidden dropout when set.
      pooling: "pooler" (the encoder's pooler, as HF's ForSequenceClassification),
        "cls" (the raw first token) or "mean" (masked mean over tokens).
      head_dropout: dropout before the head.
      initializer_range: stddev of the head's normal init.
    """

    family: str
    encoder_config: Any
    num_labels: int
    dropout: float | None = None
    pooling: str = "pooler"
    head_dropout: float = 0.1
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    input_keys: ClassVar[tuple[str, ...]] = TEXT_INPUT_KEYS

    def dummy_inputs(self) -> list[jax.Array]:
        """One-example inputs in call order, for init and shape inference."""
        return [jnp.ones((1, 8), jnp.int32) for _ in self.input_keys]

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, train: bool = False,
                 features=None, head: bool = True):
        """Returns float32 logits [B, num_labels].

        The halves apart (cached features, ftjax/feature_cache.py): `head=False` returns the
        head's input, the pooled vector [B, H], instead; `features` (such vectors) skips the
        encoder and runs the head alone (the token inputs are then unused: pass None).
        """
        if features is None:
            encoder = _encoder(self.family, self.encoder_config,
                               EncoderOptions(dtype=self.dtype, peft=self.peft, dropout=self.dropout))
            seq, pooled = encoder(input_ids, attention_mask, token_type_ids, train=train)
            if self.pooling == "cls":
                pooled = seq[:, 0]
            elif self.pooling == "mean":
                m = attention_mask[..., None].astype(seq.dtype)
                pooled = (seq * m).sum(1) / jnp.maximum(m.sum(1), 1)
            if not head:
                return pooled
        else:
            pooled = features
        x = Dropout(self.head_dropout, deterministic=not train)(pooled)
        logits = nn.Dense(self.num_labels, name="head", dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.normal(self.initializer_range))(x)
        return logits.astype(jnp.float32)


class ImageClassifier(nn.Module):
    """image encoder -> feature vector -> dropout -> Dense(num_labels) named "head".

    The head starts at zero, as in big_vision and vit_jax fine-tuning: the first
    steps then move the head only where the gradient points, not a random projection.

    Attributes:
      family: the encoder's family (registry name); its params live under its name.
      encoder_config: the encoder's config dataclass.
      num_labels: outputs (classes; 1 for regression).
      head_dropout: dropout before the head.
      dropout: overrides the encoder's dropout when set (ViT hidden dropout, CNN
        stochastic depth / classifier dropout where the family has it).
      update_batch_stats: BatchNorm encoders: train steps use and update batch
        statistics; else the stored statistics are used and kept (the default).
      image_size: the input resolution (ViT builds its position embeddings for it).
    """

    family: str
    encoder_config: Any
    num_labels: int
    head_dropout: float = 0.0
    dropout: float | None = None
    dtype: Any = jnp.float32
    peft: Peft = Peft()
    update_batch_stats: bool = False
    image_size: int | None = None
    input_keys: ClassVar[tuple[str, ...]] = ("image",)

    def dummy_inputs(self) -> list[jax.Array]:
        size = int(self.image_size or 32)
        return [jnp.zeros((1, size, size, 3), jnp.float32)]

    @nn.compact
    def __call__(self, image, *, train: bool = False, features=None, head: bool = True):
        """image: float32 NHWC, normalised. Returns float32 logits [B, num_labels].

        `head=False` returns the head's input (the encoder's feature vector) instead;
        `features` skips the encoder and runs the head alone (`image` unused: pass None).
        """
        if features is None:
            options = EncoderOptions(dtype=self.dtype, peft=self.peft, dropout=self.dropout,
                                     update_batch_stats=self.update_batch_stats, image_size=self.image_size)
            features = _encoder(self.family, self.encoder_config, options)(image, train=train)
            if not head:
                return features
        x = Dropout(self.head_dropout, deterministic=not train)(features)
        logits = nn.Dense(self.num_labels, name="head", dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.zeros)(x)
        return logits.astype(jnp.float32)


def build_classifier(family: str, model_config: dict[str, Any], *, num_labels: int, pooling: str = "pooler",
                     dropout: float | None = None, head_dropout: float | None = None,
                     dtype: str = "float32", peft: Peft = Peft(), update_batch_stats: bool = False,
                     image_size: int | None = None) -> nn.Module:
    """A classifier (or regressor, num_labels=1) over an encoder family.

    Args:
      family: the family's registry name ("bert", "vit", "resnet", "efficientnet").
      model_config: the encoder's config.json dict.
      num_labels: classes, or 1 for regression.
      pooling: text: "pooler", "cls" or "mean" (image encoders pool their own way).
      dropout: encoder dropout; None keeps the config's.
      head_dropout: dropout before the head; None: the family's default (the encoder's
        hidden dropout for text, EfficientNet's reference classifier dropout, else 0).
      dtype: compute dtype name, "float32" or "bfloat16".
      peft: model-side options of the fine-tuning method (e.g. LoRA).
      update_batch_stats: BatchNorm encoders: train with batch statistics and update them.
      image_size: image encoders: the input resolution.

    Returns:
      The Linen module; params are {family: ..., "head": {"kernel", "bias"}}.
    """
    from ftjax import models

    options = EncoderOptions(dtype=models.dtype(dtype), peft=peft, dropout=dropout,
                             update_batch_stats=update_batch_stats, image_size=image_size)
    return _build(family, model_config, options, num_labels, pooling, head_dropout)


def _build(family: str, model_config: dict[str, Any], options: EncoderOptions, num_labels: int, pooling: str,
           head_dropout: float | None) -> nn.Module:
    from ftjax import models

    spec = models.family(family)
    if "causal_lm" in spec.provides:
        raise UserError(f"the {family} family is a decoder language model: ftjax fine-tunes it with "
                        "config.task='causal_lm' (prompt -> response), not as a classifier")
    cfg = spec.config(model_config)
    common = {"family": family, "encoder_config": cfg, "num_labels": num_labels, "dropout": options.dropout,
              "dtype": options.dtype, "peft": options.peft}
    if head_dropout is None and spec.head_dropout:
        head_dropout = spec.head_dropout(cfg)  # may be None: the family has no own value here
    if spec.modality == "image":
        if head_dropout is None:
            head_dropout = 0.0
        return ImageClassifier(**common, head_dropout=head_dropout, update_batch_stats=options.update_batch_stats,
                               image_size=options.image_size)
    if spec.modality != "text":
        raise UserError(f"the {spec.name} family takes {spec.modality} inputs; classification heads "
                        "exist for text and image encoders")
    if pooling not in POOLINGS:
        raise UserError(f"config.model.pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
    if head_dropout is None:
        head_dropout = cfg.hidden_dropout_prob if options.dropout is None else options.dropout
    return SequenceClassifier(**common, pooling=pooling, head_dropout=head_dropout,
                              initializer_range=cfg.initializer_range)


def load_labelled_data(config, family: FamilySpec, process_index: int, process_count: int):
    """The labelled split data (one label per example) for the family's modality."""
    if family.modality == "image":
        from ftjax.data import images

        return images.ImageData(config, images.make_preprocess(config), process_index=process_index,
                                process_count=process_count)
    if family.modality != "text":
        raise UserError(f"the {family.name} family takes {family.modality} inputs; labelled data is "
                        "read for text and image models")
    from ftjax.data import pipeline, tokenizer as tok_lib

    tok_dir = tok_lib.tokenizer_folder(config)
    return pipeline.TextData(config, tok_lib.load_tokenizer(tok_dir), process_index=process_index,
                             process_count=process_count, tokenizer_dir=tok_dir)


class Classification(Task):
    """One of `label_names` per example."""

    name = "classification"
    eval_keys = ("label",)
    caches_features = True

    def __init__(self, num_labels: int, label_names: list[str], pooling: str = "pooler",
                 head_dropout: float | None = None):
        self.num_labels, self.label_names = int(num_labels), list(label_names)
        self.pooling, self.head_dropout = pooling, head_dropout

    @classmethod
    def load_data(cls, config, family, process_index, process_count):
        data = load_labelled_data(config, family, process_index, process_count)
        if data.regression:
            raise UserError(f"config.task={cls.name!r} needs class labels, but the labels of "
                            f"{config.data.name} are numbers: use task=regression")
        return data

    @classmethod
    def from_config(cls, config, data):
        return cls(data.num_labels, data.label_names, config.model.pooling, config.model.head_dropout)

    @classmethod
    def from_meta(cls, meta):
        return cls(meta["num_labels"], meta["label_names"], meta.get("pooling", "pooler"))

    def build_model(self, family: str, model_config, options: EncoderOptions):
        """The classifier; `options` carries the encoder's dtype, dropout, PEFT and BatchNorm choices."""
        return _build(family, model_config, options, self.num_labels, self.pooling, self.head_dropout)

    def loss(self, logits, batch):
        logits = logits.astype(jnp.float32)
        labels = batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return loss.mean(), {"accuracy": correct.mean()}

    def features(self, model, variables, batch):
        """The head's input of every row (the pooled vector), float32, in eval mode."""
        inputs = (batch[k] for k in model.input_keys)
        return model.apply(variables, *inputs, train=False, head=False).astype(jnp.float32)

    def head(self, model, variables, features, *, train, rng=None):
        """The logits of the head alone on `features` (its dropout with `train`, from `rng`)."""
        rngs = {"dropout": rng} if train else {}
        return model.apply(variables, *(None,) * len(model.input_keys), train=train, rngs=rngs,
                           features=features)

    def evaluators(self):
        return [evaluators.ClassificationMetrics(self.num_labels)]

    @classmethod
    def metric_names(cls):
        return ("accuracy", "f1", "mcc", "loss", "num_examples")

    def export_meta(self):
        return {"task": self.name, "num_labels": self.num_labels, "label_names": self.label_names,
                "pooling": self.pooling}

    @classmethod
    def hf_files(cls, meta):
        labels = list(meta["label_names"])
        return {"config.json": {
            "num_labels": meta["num_labels"],
            "problem_type": "regression" if meta["num_labels"] == 1 else "single_label_classification",
            "id2label": {str(i): n for i, n in enumerate(labels)},
            "label2id": {n: i for i, n in enumerate(labels)}}}

    def fingerprint(self):
        return {"num_labels": self.num_labels}

    def summary(self):
        return {"label_names": self.label_names}

    def render(self, logits) -> list[tuple[str, float]]:
        """(label, probability) of the most likely class, per row."""
        probs = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), -1))
        return [(self.label_names[k] if k < len(self.label_names) else str(k), float(p[k]))
                for k, p in zip(probs.argmax(-1), probs)]


TASK = Classification
