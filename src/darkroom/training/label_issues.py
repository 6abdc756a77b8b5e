"""Rows whose given label is probably wrong: confident learning (Northcutt, Jiang and Chuang,
"Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021), written from the paper.

The inputs are out-of-fold probabilities: a model that trained on a row would have learnt its
label, right or wrong, and could not dispute it.

1. Per-class thresholds t_j: the mean predicted p_j over the rows labelled j (the model's average
   self-confidence for class j), so a class the model is shy about gets a lower bar.
2. The confident joint C[i][j] counts rows labelled i whose confident class (the most probable
   among those with p_j >= t_j) is j; calibrated so that row i sums to the count of label i and
   normalised, it estimates the joint distribution Q of given and true labels.
3. Prune by noise rate: for each off-diagonal (i, j), the n * Q[i][j] rows labelled i with the
   largest margin p_j - p_i are flagged, then ranked by self-confidence, lowest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

FRAME_COLUMNS = [
    "key", "given_label", "suggested_label", "self_confidence", "suggested_confidence", "margin",
    "rank",
]  # fmt: skip


@dataclass(frozen=True, eq=False)
class LabelIssues:
    """Flagged rows, most suspicious first, and the estimates behind them.

    Attributes:
        index: Row indices of the flagged rows, ranked (lowest self-confidence first).
        given: Their given labels.
        suggested: The most probable class other than the given one.
        self_confidence: The predicted probability of the given label.
        suggested_confidence: The predicted probability of the suggested label.
        margin: suggested_confidence - self_confidence.
        thresholds: Per-class thresholds t_j (1.0 for a class no row is labelled with).
        confident_joint: (classes, classes) raw counts C[given][confident class].
        joint: (classes, classes) calibrated joint Q[given][true], summing to 1.
        noise_rate: Estimated share of wrong labels, 1 - trace(Q).
        n: Number of rows examined.
    """

    index: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    self_confidence: np.ndarray
    suggested_confidence: np.ndarray
    margin: np.ndarray
    thresholds: np.ndarray
    confident_joint: np.ndarray
    joint: np.ndarray
    noise_rate: float
    n: int

    def to_frame(self, keys: Sequence[str], class_names: Sequence[str]) -> pd.DataFrame:
        """One row per flagged row, ranked.

        Args:
            keys: The key of every examined row (n of them), in the order of the probabilities.
            class_names: Class name of each class index.

        Returns:
            Columns key, given_label, suggested_label, self_confidence, suggested_confidence,
            margin and rank (1 for the most suspicious).
        """
        if len(keys) != self.n:
            raise ValueError(f"expected {self.n} keys, got {len(keys)}")
        names = np.asarray(class_names, dtype=object)
        return pd.DataFrame(
            {
                "key": np.asarray(keys, dtype=object)[self.index],
                "given_label": names[self.given],
                "suggested_label": names[self.suggested],
                "self_confidence": self.self_confidence,
                "suggested_confidence": self.suggested_confidence,
                "margin": self.margin,
                "rank": np.arange(1, len(self.index) + 1),
            },
            columns=FRAME_COLUMNS,
        )


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"expected an (n, classes >= 2) array, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    y = np.asarray(labels)
    if y.shape != (len(p),):
        raise ValueError(f"expected {len(p)} labels, got shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must lie in [0, {p.shape[1]})")
    return p, y.astype(np.int64)


def per_class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j: mean p_j over the rows labelled j; 1.0 (never confident) for a class with no rows."""
    p, y = _check(probs, labels)
    n_classes = p.shape[1]
    counts = np.bincount(y, minlength=n_classes)
    sums = np.bincount(y, weights=p[np.arange(len(p)), y], minlength=n_classes)
    thresholds = np.ones(n_classes)
    has = counts > 0
    thresholds[has] = sums[has] / counts[has]
    return thresholds


def confident_joint(
    probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | None = None
) -> np.ndarray:
    """C[i][j]: rows labelled i whose most probable class among those reaching t_j is j.

    Rows where no class reaches its threshold are not counted.
    """
    p, y = _check(probs, labels)
    t = per_class_thresholds(p, y) if thresholds is None else np.asarray(thresholds)
    above = p >= t[None, :]
    counted = above.any(axis=1)
    # -inf below the threshold so the argmax only picks among the confident classes.
    confident = np.where(above, p, -np.inf).argmax(axis=1)
    n_classes = p.shape[1]
    joint = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(joint, (y[counted], confident[counted]), 1)
    return joint


def calibrate_joint(counts: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Q: the confident joint rescaled so row i sums to |X_{y~=i}|, then normalised to sum 1.

    A label whose rows were never counted (no class reached its threshold) is taken as clean:
    nothing says otherwise.
    """
    counts = np.asarray(counts, dtype=np.float64)
    label_counts = np.asarray(label_counts, dtype=np.float64)
    row_sums = counts.sum(axis=1)
    scaled = np.zeros_like(counts)
    seen = row_sums > 0
    scaled[seen] = counts[seen] / row_sums[seen, None] * label_counts[seen, None]
    unseen = np.flatnonzero(~seen)
    scaled[unseen, unseen] = label_counts[unseen]
    total = scaled.sum()
    return scaled / total if total > 0 else scaled


def _prune_by_noise_rate(p: np.ndarray, y: np.ndarray, joint: np.ndarray) -> np.ndarray:
    """Boolean mask: for each off-diagonal (i, j), the round(n * Q[i][j]) rows labelled i with
    the largest margin p_j - p_i; a row picked by several pairs is flagged once."""
    n, n_classes = p.shape
    flagged = np.zeros(n, dtype=bool)
    to_prune = np.rint(n * joint).astype(np.int64)
    for i in range(n_classes):
        rows = np.flatnonzero(y == i)
        for j in range(n_classes):
            k = min(int(to_prune[i, j]), len(rows))
            if i == j or k == 0:
                continue
            margin = p[rows, j] - p[rows, i]
            # Stable sort on the negated margin: ties go to the lower row index, reproducibly.
            flagged[rows[np.argsort(-margin, kind="stable")[:k]]] = True
    return flagged


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Rows whose given label confident learning doubts, most suspicious first.

    Args:
        probs: (n, classes) out-of-fold predicted probabilities.
        labels: The n given class indices.

    Returns:
        The flagged rows, ranked by self-confidence (ascending), and the joint estimates.
    """
    p, y = _check(probs, labels)
    n, n_classes = p.shape
    thresholds = per_class_thresholds(p, y)
    counts = confident_joint(p, y, thresholds)
    joint = calibrate_joint(counts, np.bincount(y, minlength=n_classes))
    index = np.flatnonzero(_prune_by_noise_rate(p, y, joint))
    given = y[index]
    others = p[index].copy()
    others[np.arange(len(index)), given] = -np.inf
    suggested = others.argmax(axis=1)
    self_conf = p[index, given]
    sugg_conf = p[index, suggested]
    margin = sugg_conf - self_conf
    # Lowest self-confidence first; ties: larger margin, then row order.
    order = np.lexsort((index, -margin, self_conf))
    return LabelIssues(
        index=index[order],
        given=given[order],
        suggested=suggested[order],
        self_confidence=self_conf[order],
        suggested_confidence=sugg_conf[order],
        margin=margin[order],
        thresholds=thresholds,
        confident_joint=counts,
        joint=joint,
        noise_rate=float(1.0 - np.trace(joint)) if n else 0.0,
        n=n,
    )
