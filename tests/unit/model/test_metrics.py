"""Classification metrics against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from darkroom.model.metrics import aggregate, classification_metrics

CLASSES = ["a", "b", "c"]
# true   probs              pred
#  a   [0.7, 0.2, 0.1]       a  ok
#  a   [0.2, 0.5, 0.3]       b  wrong
#  b   [0.1, 0.8, 0.1]       b  ok
#  c   [0.3, 0.3, 0.4]       c  ok
Y = np.array([0, 0, 1, 2])
P = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])


@pytest.fixture
def m():
    return classification_metrics(Y, P, CLASSES)


def test_accuracy_and_top1(m):
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["top1_accuracy"] == pytest.approx(m["accuracy"])
    assert "top5_accuracy" not in m  # only 3 classes


def test_confusion_matrix(m):
    # rows = true class, columns = predicted class
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_macro_precision_recall_f1(m):
    # precision: a 1/1, b 1/2, c 1/1 -> 2.5/3
    assert m["precision_macro"] == pytest.approx(2.5 / 3)
    # recall: a 1/2, b 1/1, c 1/1 -> 2.5/3
    assert m["recall_macro"] == pytest.approx(2.5 / 3)
    # F1: a 2*1*.5/1.5 = 2/3, b 2*.5*1/1.5 = 2/3, c 1 -> (2/3 + 2/3 + 1)/3 = 7/9
    assert m["f1_macro"] == pytest.approx(7 / 9)


def test_per_class(m):
    assert m["per_class_accuracy"] == {"a": pytest.approx(0.5), "b": 1.0, "c": 1.0}
    assert m["per_class_support"] == {"a": 2, "b": 1, "c": 1}


def test_log_loss(m):
    expected = -(math.log(0.7) + math.log(0.2) + math.log(0.8) + math.log(0.4)) / 4
    assert m["log_loss"] == pytest.approx(expected)


def test_unnormalized_probs_are_renormalized():
    scaled = classification_metrics(Y, P * np.array([[2.0], [3.0], [0.5], [1.0]]), CLASSES)
    expected = -(math.log(0.7) + math.log(0.2) + math.log(0.8) + math.log(0.4)) / 4
    assert scaled["log_loss"] == pytest.approx(expected)
    assert scaled["accuracy"] == pytest.approx(0.75)


def test_two_classes_perfect():
    m = classification_metrics(
        [0, 1, 1, 0], [[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4]], ["no", "yes"]
    )
    assert m["accuracy"] == 1.0
    assert m["precision_macro"] == m["recall_macro"] == m["f1_macro"] == 1.0
    assert m["confusion_matrix"] == [[2, 0], [0, 2]]
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.6)) / 4
    assert m["log_loss"] == pytest.approx(expected)


def test_class_without_samples():
    # Class "c" never appears: per-class accuracy None, and it still has a confusion row.
    m = classification_metrics([0, 1], [[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], CLASSES)
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": None}
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    # precision: a 1, b 0 (never predicted: zero_division=0), c 0/1 -> 1/3
    assert m["precision_macro"] == pytest.approx(1 / 3)
    # recall: a 1, b 0, c has no support -> 0 -> 1/3
    assert m["recall_macro"] == pytest.approx(1 / 3)


def test_top5_with_six_classes():
    classes = list("uvwxyz")
    y = np.array([0, 5, 3])
    probs = np.array(
        [
            [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # top1 hit
            [0.3, 0.25, 0.2, 0.15, 0.1, 0.0],  # class 5 ranked last: top5 miss
            [0.3, 0.25, 0.2, 0.15, 0.1, 0.0],  # class 3 ranked 4th: top5 hit, top1 miss
        ]
    )
    m = classification_metrics(y, probs, classes)
    assert m["top1_accuracy"] == pytest.approx(1 / 3)
    assert m["top5_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_top5_only_with_more_than_five_classes():
    # With 5 classes top-5 is 1.0 by construction: not reported; top-1 always is.
    m = classification_metrics([4], [[0.3, 0.2, 0.2, 0.2, 0.1]], list("abcde"))
    assert "top5_accuracy" not in m
    assert m["top1_accuracy"] == 0.0


def test_per_class_accuracy_next_to_training_images():
    m = classification_metrics(Y, P, CLASSES, train_counts=[40, 7, 0])
    assert m["per_class_train_images"] == {"a": 40, "b": 7, "c": 0}
    assert m["per_class_accuracy"]["a"] == pytest.approx(0.5)
    assert "per_class_train_images" not in classification_metrics(Y, P, CLASSES)


def test_metrics_json_serializable(m):
    import json

    assert json.loads(json.dumps(m))["confusion_matrix"] == m["confusion_matrix"]


def test_aggregate_mean_std():
    folds = [
        {"accuracy": 0.5, "f1_macro": 0.4, "log_loss": 1.0},
        {"accuracy": 0.7, "f1_macro": 0.6, "log_loss": 0.5},
        {"accuracy": 0.9, "f1_macro": 0.8, "log_loss": None},
    ]
    out = aggregate(folds)
    assert out["accuracy"]["mean"] == pytest.approx(0.7)
    # population std: sqrt(((-.2)^2 + 0 + .2^2) / 3)
    assert out["accuracy"]["std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert out["f1_macro"]["mean"] == pytest.approx(0.6)
    assert "log_loss" not in out  # missing in one fold
    assert "top5_accuracy" not in out
    assert "precision_macro" not in out


def test_aggregate_of_real_fold_metrics():
    a = classification_metrics(Y, P, CLASSES)
    # true [a, b, c, c] vs pred [a, b, b, c] -> 3 right of 4
    b = classification_metrics([0, 1, 2, 2], P, CLASSES)
    assert b["accuracy"] == pytest.approx(0.75)
    out = aggregate([a, b])
    assert out["accuracy"] == {"mean": pytest.approx(0.75), "std": pytest.approx(0.0)}
    assert set(out) == {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "log_loss",
        "ece",
    }


def test_aggregate_empty():
    assert aggregate([]) == {}


def test_empty_input_does_not_raise():
    m = classification_metrics(np.zeros(0, np.int64), np.zeros((0, 3)), CLASSES)
    assert m["n"] == 0
    assert m["accuracy"] == 0.0
    assert m["f1_macro"] == 0.0
    assert m["log_loss"] is None
    assert m["confusion_matrix"] == [[0, 0, 0]] * 3
    assert m["per_class_accuracy"] == dict.fromkeys(CLASSES)
    assert "top1_accuracy" not in m
