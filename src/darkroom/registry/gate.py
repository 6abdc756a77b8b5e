"""The promotion gate's rules: they tell progress from noise.

A first champion must beat always guessing the holdout's most frequent class, and a challenger
must beat the champion significantly on the paired per-image predictions (exact McNemar test),
not by a lucky image or two, without losing too much of any class's recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from darkroom.config import RetrainConfig
from darkroom.model import metrics as mx

SIGNIFICANCE_TEST = "exact McNemar"
# Metrics are ratios of counts: a gain equal to a threshold must not fail by a rounding ulp.
_EPS = 1e-9


@dataclass
class Holdout:
    """One model's result on a snapshot's holdout rows.

    Attributes:
        metrics: ``metrics.classification_metrics`` of the model on the holdout.
        correct: per holdout row, in the snapshot's row order, whether the model's top class
            is the label; two models' lists pair up row by row for the significance test.
    """

    metrics: dict
    correct: list[bool]


@dataclass
class Decision:
    """The gate's verdict on two models' results from the same holdout.

    Attributes:
        rule: the verdict in words, naming the rule that decided.
        challenger: the candidate's primary ``metric``.
        champion: the champion's ``metric``; None when there is no champion yet.
        baseline: ``metric`` of always predicting the holdout's most frequent class.
        test: the paired significance test; None for a first model (nothing to pair with).
        b: holdout images the challenger gets right and the champion wrong.
        c: holdout images the champion gets right and the challenger wrong.
        p_value: the test's two-sided p-value.
    """

    promote: bool
    rule: str
    metric: str
    challenger: float
    champion: float | None
    baseline: float
    min_delta: float
    max_class_recall_drop: float
    min_metric: float
    baseline_margin: float
    max_p_value: float
    test: str | None = None
    b: int | None = None
    c: int | None = None
    p_value: float | None = None
    per_class_recall: dict = field(default_factory=dict)
    recall_drops: dict = field(default_factory=dict)


def mcnemar_p_value(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``b`` against ``b + c`` fair coin
    flips. Only the discordant pairs say which model is better; with no gain in truth each
    falls either way with probability 1/2.

    Args:
        b: pairs the first model gets right and the second wrong.
        c: pairs the second model gets right and the first wrong.
    """
    n = b + c
    if n == 0:
        return 1.0
    # C(n, i) by the recurrence C(n, i+1) = C(n, i) (n - i) / (i + 1): exact integers and
    # linear time, where a math.comb per term takes seconds at ten thousand pairs
    term = tail = 1
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)  # one rounding, no underflow: Python ints divide exactly


def discordant_pairs(challenger: list[bool], champion: list[bool]) -> tuple[int, int]:
    """(b, c): rows only the challenger gets right, rows only the champion gets right."""
    if len(challenger) != len(champion):
        raise ValueError(
            f"the two models were not measured on the same holdout rows "
            f"({len(challenger)} against {len(champion)})"
        )
    b = sum(new and not old for new, old in zip(challenger, champion, strict=True))
    c = sum(old and not new for new, old in zip(challenger, champion, strict=True))
    return int(b), int(c)


def majority_baseline(metrics: dict, metric: str) -> float:
    """``metric`` of predicting the holdout's most frequent class for every row, scored by the
    same function as the models (ties go to the first class in index order)."""
    support = metrics["per_class_support"]
    classes = list(support)
    counts = np.array([support[c] for c in classes], dtype=np.int64)
    y_true = np.repeat(np.arange(len(classes)), counts)
    probs = np.zeros((len(y_true), len(classes)))
    probs[:, counts.argmax()] = 1.0
    return float(mx.classification_metrics(y_true, probs, classes)[metric])


def _per_class_recall(challenger: dict, champion: dict | None) -> dict:
    new = challenger.get("per_class_accuracy", {})
    old = (champion or {}).get("per_class_accuracy", {})
    return {c: {"challenger": r, "champion": old.get(c)} for c, r in new.items()}


def _recall_drops(per_class: dict, limit: float) -> dict:
    return {
        c: v["champion"] - v["challenger"]
        for c, v in per_class.items()
        if v["challenger"] is not None
        and v["champion"] is not None
        and v["champion"] - v["challenger"] > limit + 1e-12
    }


def decide(challenger: Holdout, champion: Holdout | None, config: RetrainConfig) -> Decision:
    """The gate's rules, on two models' results from the same holdout rows.

    With no champion, the first model must reach ``config.min_metric`` and beat the
    majority-class baseline by ``config.baseline_margin`` on the primary metric
    (``config.train.metric``). A challenger must beat the champion's metric by at least
    ``config.min_delta`` (and by more than nothing), be right on significantly more of the
    images where the two disagree (exact McNemar p below ``config.max_p_value``; 1 turns the
    test off), and lose no more than ``config.max_class_recall_drop`` of any class's recall.

    Raises:
        ValueError: the two results do not pair up row by row.
    """
    metric = config.train.metric
    d = Decision(
        promote=False,
        rule="",
        metric=metric,
        challenger=challenger.metrics[metric],
        champion=champion.metrics[metric] if champion else None,
        baseline=majority_baseline(challenger.metrics, metric),
        min_delta=config.min_delta,
        max_class_recall_drop=config.max_class_recall_drop,
        min_metric=config.min_metric,
        baseline_margin=config.baseline_margin,
        max_p_value=config.max_p_value,
    )
    d.per_class_recall = _per_class_recall(challenger.metrics, champion and champion.metrics)
    if champion is None:
        d.promote, d.rule = _first_model_rule(d)
        return d
    d.test = SIGNIFICANCE_TEST
    d.b, d.c = discordant_pairs(challenger.correct, champion.correct)
    d.p_value = mcnemar_p_value(d.b, d.c)
    d.recall_drops = _recall_drops(d.per_class_recall, d.max_class_recall_drop)
    d.promote, d.rule = _challenger_rule(d)
    return d


def _first_model_rule(d: Decision) -> tuple[bool, str]:
    new, base, m = d.challenger, d.baseline, d.metric
    gain = new - base
    if new < d.min_metric - _EPS:
        return False, f"rejected: first model {m} {new:.4f} is below min_metric {d.min_metric:g}"
    if gain <= 0 or gain < d.baseline_margin - _EPS:
        return False, (
            f"rejected: first model {m} {new:.4f} does not beat the majority-class baseline "
            f"{base:.4f} by baseline_margin {d.baseline_margin:g} (gain {gain:+.4f})"
        )
    return True, (
        f"promoted: no champion yet; first model {m} {new:.4f} beats the majority-class "
        f"baseline {base:.4f} by {gain:+.4f} (baseline_margin {d.baseline_margin:g}) and "
        f"reaches min_metric {d.min_metric:g}"
    )


def _significance(d: Decision) -> tuple[bool, str]:
    """Whether the paired test passes, and the sentence that says so."""
    p, limit = f"{d.p_value:.3g}", f"{d.max_p_value:g}"
    pairs = f"{d.b} vs {d.c} discordant holdout images"
    if d.max_p_value >= 1:
        return True, f"significance test off (max_p_value 1; {d.test} p={p}, {pairs})"
    if d.b <= d.c:
        return False, (
            f"rejected: challenger is not right more often where the two disagree (right "
            f"only on {d.b} holdout images, the champion only on {d.c}; {d.test} p={p}, "
            f"max_p_value {limit})"
        )
    if d.p_value >= d.max_p_value:
        return False, (
            f"rejected: gain not significant ({d.test} p={p} >= max_p_value {limit}, {pairs})"
        )
    return True, f"significant ({d.test} p={p} < max_p_value {limit}, {pairs})"


def _challenger_rule(d: Decision) -> tuple[bool, str]:
    new, old, m = d.challenger, d.champion, d.metric
    gain = new - old
    if gain <= 0 or gain < d.min_delta - _EPS:
        return False, (
            f"rejected: challenger {m} {new:.4f} does not beat champion {old:.4f} by at least "
            f"min_delta {d.min_delta:g} (gain {gain:+.4f}) on the same holdout"
        )
    significant, why = _significance(d)
    if not significant:
        return False, why
    if d.recall_drops:
        drops = d.recall_drops
        worst = max(drops, key=drops.get)
        also = sorted(set(drops) - {worst})
        return False, (
            f"rejected: recall of class {worst!r} fell by {drops[worst]:.4f} "
            f"(> max_class_recall_drop {d.max_class_recall_drop:g}) although {m} rose "
            f"{old:.4f} -> {new:.4f}" + (f"; also {also}" if also else "")
        )
    return True, (
        f"promoted: challenger {m} {new:.4f} beats champion {old:.4f} by {gain:+.4f} "
        f"(min_delta {d.min_delta:g}); {why}; no class recall fell by more than "
        f"max_class_recall_drop {d.max_class_recall_drop:g}"
    )
