"""Regression: one number per example, from a one-output head (the classifiers' modules).

Loss: squared error; dev/test: Pearson, Spearman and MSE
(ftjax.evaluators.RegressionMetrics). Labels are float features (data.regression for
local files, or a TFDS float label such as glue/stsb's).
"""

from __future__ import annotations

import numpy as np

from ftjax import evaluators
from ftjax.errors import UserError
from ftjax.tasks import classification


class Regression(classification.Classification):
    """A real-valued target per example: the classifier with one output and squared error."""

    name = "regression"

    def __init__(self, pooling: str = "pooler", head_dropout: float | None = None):
        super().__init__(1, [], pooling, head_dropout)

    @classmethod
    def load_data(cls, config, family, process_index, process_count):
        data = classification.load_labelled_data(config, family, process_index, process_count)
        if not data.regression:
            raise UserError(f"config.task={cls.name!r} needs number labels, but {config.data.name} has "
                            "classes: use task=classification (or data.regression=True for local files)")
        return data

    @classmethod
    def from_config(cls, config, data):
        return cls(config.model.pooling, config.model.head_dropout)

    @classmethod
    def from_meta(cls, meta):
        return cls(meta.get("pooling", "pooler"))

    def loss(self, outputs, batch):
        err = outputs[:, 0].astype(np.float32) - batch["label"].astype(np.float32)
        return (err**2).mean(), {}

    def evaluators(self):
        return [evaluators.RegressionMetrics()]

    @classmethod
    def metric_names(cls):
        return ("pearson", "spearman", "mse", "loss", "num_examples")

    def render(self, outputs) -> list[tuple[str, float]]:
        """("", value) per row."""
        return [("", float(v)) for v in np.asarray(outputs)[:, 0]]


TASK = Regression
