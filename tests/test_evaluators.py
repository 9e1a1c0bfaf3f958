"""Metrics checked against hand-worked numbers."""

import math

import numpy as np
import pytest

from ftjax import evaluators
from ftjax.errors import UserError


def _onehot_logits(preds, k):
    return np.eye(k)[preds] * 5.0


def test_binary_metrics_by_hand():
    # labels 1,1,1,0,0,0,0 ; preds 1,1,0,0,0,1,0  -> tp=2 fn=1 fp=1 tn=3
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    preds = np.array([1, 1, 0, 0, 0, 1, 0])
    m = evaluators.ClassificationMetrics(2)
    m.update(_onehot_logits(preds[:4], 2), {"label": labels[:4], "mask": np.ones(4)})
    # a padded second batch: the last row is padding and must not count
    m.update(_onehot_logits(np.r_[preds[4:], 1], 2), {"label": np.r_[labels[4:], 0], "mask": np.r_[np.ones(3), 0]})
    r = m.result()
    assert r["num_examples"] == 7
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2tp / (2tp + fp + fn)
    assert r["mcc"] == pytest.approx((2 * 3 - 1 * 1) / math.sqrt(3 * 3 * 4 * 4))
    assert r["loss"] > 0


def test_multiclass_macro_f1_and_mcc():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    m = evaluators.ClassificationMetrics(3)
    m.update(_onehot_logits(preds, 3), {"label": labels, "mask": np.ones(6)})
    r = m.result()
    # per-class F1: c0 tp1 fp1 fn1 -> .5 ; c1 tp2 fp1 fn0 -> .8 ; c2 tp1 fp0 fn1 -> 2/3
    assert r["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Gorodkin: c=4 correct, s=6, p=(2,3,1), t=(2,2,2)
    assert r["mcc"] == pytest.approx((4 * 6 - (4 + 6 + 2)) / math.sqrt((36 - 14) * (36 - 12)))


def test_a_class_never_predicted_gives_zero_not_nan():
    m = evaluators.ClassificationMetrics(2)
    m.update(_onehot_logits(np.zeros(4, int), 2), {"label": np.array([0, 1, 0, 1]), "mask": np.ones(4)})
    r = m.result()
    assert r["f1"] == 0.0 and r["mcc"] == 0.0 and r["accuracy"] == 0.5


def test_regression_pearson_spearman_with_ties():
    preds = np.array([1.0, 2.0, 2.0, 4.0])
    labels = np.array([1.0, 3.0, 2.0, 5.0])
    m = evaluators.RegressionMetrics()
    m.update(preds[:, None], {"label": labels, "mask": np.ones(4)})
    r = m.result()
    # ranks: preds (1, 2.5, 2.5, 4), labels (1, 3, 2, 4)
    np.testing.assert_allclose(evaluators.average_ranks(preds), [1, 2.5, 2.5, 4])
    a, b = np.array([1, 2.5, 2.5, 4]) - 2.5, np.array([1, 3, 2, 4]) - 2.5
    assert r["spearman"] == pytest.approx((a * b).sum() / math.sqrt((a**2).sum() * (b**2).sum()))
    assert r["mse"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert r["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])


def test_empty_split_is_a_user_error():
    m = evaluators.ClassificationMetrics(2)
    m.update(np.zeros((2, 2)), {"label": np.zeros(2), "mask": np.zeros(2)})
    with pytest.raises(UserError, match="no examples"):
        m.result()


def test_sequence_metrics_exact_match_and_token_accuracy():
    m = evaluators.SequenceMetrics()
    labels = np.array([[5, 6, 7, 0], [5, 6, 0, 0], [1, 1, 1, 1]])
    label_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    tokens = np.array([[5, 6, 7, 9], [5, 8, 3, 3], [2, 2, 2, 2]])  # row 3 is padding
    m.update({"tokens": tokens}, {"labels": labels, "label_mask": label_mask, "mask": np.array([1, 1, 0])})
    r = m.result()
    assert r["num_examples"] == 2
    assert r["exact_match"] == pytest.approx(0.5)
    assert r["token_accuracy"] == pytest.approx(4 / 5)
