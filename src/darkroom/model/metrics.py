"""Classification metrics from labels and class probabilities."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from darkroom.model.calibration import calibration_scores

# The scalar metrics a fold summary keeps and the cross-validation aggregates.
SCALARS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss", "ece")
SCALARS += ("top5_accuracy",)


def _macro_scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple:
    if not len(y_true):  # sklearn refuses empty input
        return 0.0, 0.0, 0.0
    p, r, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(n_classes), average="macro", zero_division=0
    )
    return float(p), float(r), float(f1)


def _topk(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> dict:
    # top-k with k >= the class count is 1.0 by construction: only report it when it says
    # something (top-1 always does)
    out = {}
    for k in (1, 5):
        if (k == 1 or k < n_classes) and len(y_true):
            topk = np.argsort(-probs, axis=1)[:, :k]
            out[f"top{k}_accuracy"] = float((topk == y_true[:, None]).any(1).mean())
    return out


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], train_counts: list[int] | None = None
) -> dict:
    """Accuracy, macro precision/recall/F1, top-1 (and top-5 with more than 5 classes), log
    loss, expected calibration error (15 bins), confusion matrix, per-class accuracy and
    support.

    Args:
        y_true: class indices, shape (n,).
        probs: class probabilities, shape (n, len(classes)).
        train_counts: training images per class (index order); when given, reported as
            ``per_class_train_images`` next to the per-class accuracy.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs):  # float32 softmax sums drift from 1; classes a model lacks leave a gap
        probs = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
    n, labels = len(classes), np.arange(len(classes))
    y_pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    p, r, f1 = _macro_scores(y_true, y_pred, n)
    cm = (
        confusion_matrix(y_true, y_pred, labels=labels)
        if len(y_true)
        else np.zeros((n, n), dtype=np.int64)
    )
    support = cm.sum(1)
    out = {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "precision_macro": p,
        "recall_macro": r,
        "f1_macro": f1,
        "log_loss": float(log_loss(y_true, np.clip(probs, 1e-12, 1), labels=labels))
        if len(y_true)
        else None,
        "ece": calibration_scores(probs, y_true).ece if len(y_true) else None,
        "confusion_matrix": cm.tolist(),
        "per_class_accuracy": {
            c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)
        },
        "per_class_support": {c: int(s) for c, s in zip(classes, support, strict=True)},
        **_topk(y_true, probs, n),
    }
    if train_counts is not None:
        out["per_class_train_images"] = dict(zip(classes, map(int, train_counts), strict=True))
    return out


def aggregate(fold_metrics: list[dict], keys=SCALARS) -> dict:
    """Mean and std across folds of each scalar metric present in every fold."""
    out = {}
    for k in keys:
        vals = [m[k] for m in fold_metrics if m.get(k) is not None]
        if len(vals) == len(fold_metrics) and vals:
            out[k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return out
