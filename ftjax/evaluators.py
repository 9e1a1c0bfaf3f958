"""Evaluators: metrics over whole evaluation splits, accumulated on the host.

An evaluator (big_vision style) takes `update(predictions, rows)` once per eval batch,
with the host copy of the task's on-device predictions and the batch rows it needs
(always "mask": 1 for real rows, 0 for padding), and returns `{name: value}` from
`result()`. Tasks (ftjax/tasks/) choose theirs.

Classification: accuracy, F1 (binary: of class 1; multi-class: macro), Matthews
correlation (multi-class form), mean cross-entropy. Regression (one output): Pearson,
Spearman (ties get their average rank) and MSE. Padding rows (mask 0) never count.
"""

from __future__ import annotations

import numpy as np

from ftjax.errors import UserError


class _Accumulator:
    def __init__(self):
        self._logits, self._labels = [], []

    def update(self, logits: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Adds one batch; rows with mask 0 are dropped.

        Args:
          logits: [b, C] (or [b, 1] for regression).
          rows: "label" ([b] class indices or float targets) and "mask" ([b], 1 for
            real rows and 0 for padding rows).
        """
        keep = np.asarray(rows["mask"]) > 0
        self._logits.append(np.asarray(logits, np.float64)[keep])
        self._labels.append(np.asarray(rows["label"])[keep])

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._logits or sum(len(x) for x in self._labels) == 0:
            raise UserError("the evaluation split has no examples")
        return np.concatenate(self._logits), np.concatenate(self._labels)


class ClassificationMetrics(_Accumulator):
    """accuracy, f1, mcc, loss and num_examples over every real example."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.num_labels = num_labels

    def result(self) -> dict[str, float]:
        logits, labels = self._arrays()
        labels = labels.astype(np.int64)
        preds = logits.argmax(-1)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        k = max(self.num_labels, logits.shape[-1])
        confusion = np.zeros((k, k), np.int64)
        np.add.at(confusion, (labels, preds), 1)
        return {
            "accuracy": float((preds == labels).mean()),
            "f1": f1_from_confusion(confusion),
            "mcc": mcc_from_confusion(confusion),
            "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "num_examples": int(len(labels)),
        }


class RegressionMetrics(_Accumulator):
    """pearson, spearman, mse and num_examples over every real example."""

    def result(self) -> dict[str, float]:
        logits, labels = self._arrays()
        preds, labels = logits[:, 0], labels.astype(np.float64)
        return {
            "pearson": pearson(preds, labels),
            "spearman": pearson(average_ranks(preds), average_ranks(labels)),
            "mse": float(((preds - labels) ** 2).mean()),
            "loss": float(((preds - labels) ** 2).mean()),
            "num_examples": int(len(labels)),
        }


class SequenceMetrics:
    """Token-sequence predictions against references: exact_match, token_accuracy, num_examples.

    `predictions["tokens"]` and `rows["labels"]` are int [b, T] (compared up to the
    reference length given by `rows["label_mask"]`; predictions are cut or padded to it).
    """

    def __init__(self):
        self._exact, self._correct, self._tokens, self._n = 0, 0, 0, 0

    def update(self, predictions: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
        tokens, labels = np.asarray(predictions["tokens"]), np.asarray(rows["labels"])
        label_mask = np.asarray(rows["label_mask"]) > 0
        for pred, ref, m, real in zip(tokens, labels, label_mask, np.asarray(rows["mask"]) > 0):
            if not real:
                continue
            ref = ref[m]
            pred = pred[:len(ref)]
            pred = np.pad(pred, (0, len(ref) - len(pred)), constant_values=-1)
            hits = int((pred == ref).sum())
            self._exact += int(hits == len(ref))
            self._correct += hits
            self._tokens += len(ref)
            self._n += 1

    def result(self) -> dict[str, float]:
        if not self._n:
            raise UserError("the evaluation split has no examples")
        return {"exact_match": self._exact / self._n, "token_accuracy": self._correct / max(self._tokens, 1),
                "num_examples": self._n}


def f1_from_confusion(confusion: np.ndarray) -> float:
    """Binary: F1 of class 1. Multi-class: unweighted mean of per-class F1."""
    tp = np.diag(confusion).astype(np.float64)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    denom = predicted + actual
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[1]) if confusion.shape[0] == 2 else float(f1.mean())


def mcc_from_confusion(confusion: np.ndarray) -> float:
    """Matthews correlation coefficient (Gorodkin's multi-class form); 0 when undefined."""
    c = confusion.astype(np.float64)
    n, correct = c.sum(), np.trace(c)
    p, t = c.sum(0), c.sum(1)
    cov = correct * n - (p * t).sum()
    denom = np.sqrt((n**2 - (p**2).sum()) * (n**2 - (t**2).sum()))
    return float(cov / denom) if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant."""
    a, b = np.asarray(a, np.float64) - np.mean(a), np.asarray(b, np.float64) - np.mean(b)
    denom = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0
