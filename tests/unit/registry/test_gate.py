"""The promotion gate's rules, rollback lineage and racing promotions on a local folder."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.model.metrics import classification_metrics
from darkroom.registry import pointer as registry
from darkroom.registry.gate import Holdout, decide, majority_baseline, mcnemar_p_value
from darkroom.registry.pointer import PromotionLost, RegistryError, lineage, promote, rollback

RULE_NAMES = ("min_metric", "baseline_margin", "min_delta", "max_p_value", "max_class_recall_drop")


def holdout(labels, right, classes) -> Holdout:
    """A model's real holdout result: right on the rows where ``right`` is true, else it
    predicts the next class."""
    y, ok = np.asarray(labels), np.asarray(right, dtype=bool)
    pred = np.where(ok, y, (y + 1) % len(classes))
    return Holdout(classification_metrics(y, np.eye(len(classes))[pred], classes), ok.tolist())


def wrong_on(n, *ranges) -> np.ndarray:
    """Right on every one of ``n`` rows except those in ``ranges``."""
    right = np.ones(n, dtype=bool)
    for r in ranges:
        right[list(r)] = False
    return right


def gate(metric="accuracy", **thresholds) -> RetrainConfig:
    return RetrainConfig(train={"metric": metric}, **thresholds)


def named(rule: str) -> set[str]:
    return {name for name in RULE_NAMES if name in rule}


# ---- the exact McNemar test -------------------------------------------------------------------


@pytest.mark.parametrize(
    "b, c, p",
    [
        (10, 0, 2 / 1024),  # 2 * C(10,0) / 2^10
        (0, 10, 2 / 1024),
        (6, 2, 2 * (1 + 8 + 28) / 256),  # 0.289
        (15, 5, 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20),  # 0.0414
        (3, 1, 2 * (1 + 4) / 16),
        (1, 0, 1.0),  # one discordant image can never be significant
        (5, 5, 1.0),  # the two-sided sum passes 1 when b == c
        (0, 0, 1.0),
    ],
)
def test_mcnemar_p_value_matches_hand_computed_values(b, c, p):
    assert mcnemar_p_value(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_p_value_stays_exact_for_thousands_of_discordant_images():
    # 5200 vs 4800: z = 399 / 100 with continuity correction; the exact tail is close to the
    # normal one and far from 0, where 2**-10000 in floats would underflow.
    p = mcnemar_p_value(5200, 4800)
    assert p == pytest.approx(math.erfc(3.99 / math.sqrt(2)), rel=0.02)
    assert mcnemar_p_value(5000, 5000) == 1.0


# ---- a first model against the majority-class baseline ---------------------------------------

TEN = [str(i) for i in range(10)]
# 100 holdout images over 10 classes, the largest class 18 of them: the baseline is 0.18
SKEWED = np.repeat(np.arange(10), [18, 10, 10, 10, 10, 10, 9, 9, 8, 6])


def test_a_first_model_at_0_20_does_not_beat_a_0_18_baseline_by_0_05():
    d = decide(holdout(SKEWED, wrong_on(100, range(20, 100)), TEN), None, gate())
    assert d.challenger == 0.20 and d.baseline == pytest.approx(0.18)
    assert not d.promote and d.champion is None and d.test is None and d.p_value is None
    assert d.rule.startswith("rejected: first model accuracy 0.2000")
    assert "majority-class baseline 0.1800" in d.rule and "gain +0.0200" in d.rule


def test_a_first_model_must_clear_the_baseline_by_the_margin():
    right = {acc: wrong_on(100, range(acc, 100)) for acc in (22, 23)}  # 0.22, 0.23 accuracy
    # 0.22 falls short of 0.18 + 0.05 but clears 0.18 + 0.04; 0.23 clears 0.18 + 0.05
    assert not decide(holdout(SKEWED, right[22], TEN), None, gate(baseline_margin=0.05)).promote
    assert decide(holdout(SKEWED, right[22], TEN), None, gate(baseline_margin=0.04)).promote
    d = decide(holdout(SKEWED, right[23], TEN), None, gate(baseline_margin=0.05))
    assert d.promote and d.rule.startswith("promoted: no champion yet")
    assert "baseline 0.1800 by +0.0500" in d.rule
    # a model no better than the baseline fails even with no margin to clear
    no_better = holdout(SKEWED, SKEWED == 0, TEN)
    assert no_better.metrics["accuracy"] == 0.18
    assert not decide(no_better, None, gate(baseline_margin=0)).promote


def test_a_margin_met_exactly_counts_as_met():
    # 15 of 100 in the largest class, 20 right: 0.20 - 0.15 is 0.05 up to a float ulp
    labels = np.repeat(np.arange(10), [15, 15, 10, 10, 10, 10, 10, 10, 5, 5])
    d = decide(holdout(labels, wrong_on(100, range(20, 100)), TEN), None, gate())
    assert d.baseline == pytest.approx(0.15) and d.promote, d.rule
    assert not decide(holdout(labels, wrong_on(100, range(19, 100)), TEN), None, gate()).promote


def test_a_first_model_below_min_metric_is_rejected_whatever_the_baseline():
    d = decide(holdout(SKEWED, wrong_on(100, range(45, 100)), TEN), None, gate(min_metric=0.5))
    assert d.challenger - d.baseline > 0.25  # far above the baseline, still not good enough
    assert not d.promote and "below min_metric 0.5" in d.rule and named(d.rule) == {"min_metric"}


def test_the_f1_baseline_is_the_macro_f1_of_predicting_the_majority_class():
    # the majority class: precision 18/100, recall 1, F1 2*18/118; nine classes of F1 0
    metrics = holdout(SKEWED, wrong_on(100), TEN).metrics
    assert majority_baseline(metrics, "f1_macro") == pytest.approx(2 * 18 / 118 / 10)
    assert majority_baseline(metrics, "accuracy") == pytest.approx(0.18)


# ---- a challenger against the champion, paired on the same holdout rows ----------------------

FOUR = ["a", "b", "c", "d"]
CYCLE = np.arange(144) % 4  # 144 holdout images, 36 per class, classes interleaved


def test_a_one_image_gain_on_144_images_is_noise():
    champion = holdout(CYCLE, wrong_on(144, range(0, 14)), FOUR)  # 130 right
    challenger = holdout(CYCLE, wrong_on(144, range(5, 18)), FOUR)  # 131 right
    d = decide(challenger, champion, gate())
    assert d.challenger - d.champion == pytest.approx(1 / 144)  # beats min_delta 0
    assert (d.b, d.c) == (5, 4) and d.p_value == 1.0
    assert not d.promote and d.test == "exact McNemar"
    assert d.rule.startswith("rejected: gain not significant (exact McNemar p=1 >= max_p_value")
    assert "5 vs 4 discordant" in d.rule and named(d.rule) == {"max_p_value"}
    # the same gain with only the one image differing is no better evidence
    lucky = holdout(CYCLE, wrong_on(144, range(1, 14)), FOUR)
    d = decide(lucky, champion, gate())
    assert (d.b, d.c, d.p_value, d.promote) == (1, 0, 1.0, False)


def test_a_large_paired_gain_is_promoted():
    champion = holdout(CYCLE, wrong_on(144, range(0, 44)), FOUR)  # 100 right
    challenger = holdout(CYCLE, wrong_on(144, range(22, 46)), FOUR)  # 120 right
    d = decide(challenger, champion, gate(min_delta=0.1))
    assert (d.b, d.c) == (22, 2)
    assert d.p_value == pytest.approx(2 * (1 + 24 + 276) / 2**24)
    assert d.promote and d.rule.startswith("promoted: challenger accuracy 0.8333 beats champion")
    assert "exact McNemar p=3.59e-05 < max_p_value 0.05, 22 vs 2 discordant" in d.rule


def test_a_gain_the_champion_matches_elsewhere_is_not_significant():
    # 80 "A", 20 "B": the challenger fixes 20 "A" images and breaks 15 "B" ones; accuracy
    # +0.05, but 20 against 15 discordant images is what a coin gives
    labels = np.repeat([0, 1], [80, 20])
    champion = holdout(labels, wrong_on(100, range(60, 80)), ["A", "B"])
    challenger = holdout(labels, wrong_on(100, range(85, 100)), ["A", "B"])
    d = decide(challenger, champion, gate(max_class_recall_drop=1))
    assert (d.b, d.c) == (20, 15) and d.p_value > 0.4 and not d.promote
    assert "not significant" in d.rule
    # max_p_value 1 turns the test off: the metric and recall rules alone decide
    assert decide(challenger, champion, gate(max_p_value=1, max_class_recall_drop=1)).promote


def test_a_challenger_right_less_often_is_rejected_even_with_a_better_metric():
    # the named metric rises, yet the champion alone is right on more images: F1 is up because
    # the challenger spreads its misses, accuracy is down
    labels = np.repeat([0, 1], [80, 20])
    champion = holdout(labels, wrong_on(100, range(80, 100)), ["A", "B"])  # always "A"
    challenger = holdout(labels, wrong_on(100, range(0, 30), range(90, 100)), ["A", "B"])
    d = decide(challenger, champion, gate("f1_macro", max_class_recall_drop=1))
    assert d.challenger > d.champion and (d.b, d.c) == (10, 30)
    assert not d.promote and "not right more often" in d.rule
    assert named(d.rule) == {"max_p_value"}


def test_min_delta_requires_a_margin():
    labels = np.arange(1000) % 4
    champion = holdout(labels, wrong_on(1000, range(0, 100)), FOUR)  # 0.900
    small = holdout(labels, wrong_on(1000, range(5, 100)), FOUR)  # 0.905
    d = decide(small, champion, gate(min_delta=0.01))
    assert not d.promote and "min_delta 0.01" in d.rule and "(gain +0.0050)" in d.rule
    d = decide(
        holdout(labels, wrong_on(1000, range(20, 100)), FOUR), champion, gate(min_delta=0.01)
    )
    assert d.promote and "+0.0200" in d.rule and (d.b, d.c) == (20, 0)


def test_a_class_recall_drop_beyond_the_limit_rejects_a_better_model():
    # 200 cats, 200 dogs; champion: cat 0.90, dog 0.70; challenger: cat 0.80, dog 0.90
    labels = np.repeat([0, 1], 200)
    champion = holdout(labels, wrong_on(400, range(0, 20), range(200, 260)), ["cat", "dog"])
    challenger = holdout(labels, wrong_on(400, range(0, 40), range(200, 220)), ["cat", "dog"])
    d = decide(challenger, champion, gate(max_class_recall_drop=0.05))
    assert (d.champion, d.challenger) == (0.80, 0.85)
    assert (d.b, d.c) == (40, 20) and d.p_value < 0.05  # significant: the recall rule decides
    assert not d.promote
    assert "'cat'" in d.rule and "0.1000" in d.rule and named(d.rule) == {"max_class_recall_drop"}
    assert d.recall_drops == {"cat": pytest.approx(0.10)}
    assert decide(challenger, champion, gate(max_class_recall_drop=0.15)).promote


def test_per_class_recall_is_reported_side_by_side():
    labels = np.repeat([0, 1], 10)
    challenger = holdout(labels, wrong_on(20, range(18, 20)), ["a", "b"])
    champion = holdout(labels, wrong_on(20, range(0, 3), range(10, 11)), ["a", "b"])
    d = decide(challenger, champion, gate())
    assert d.per_class_recall == {
        "a": {"challenger": 1.0, "champion": 0.7},
        "b": {"challenger": 0.8, "champion": 0.9},
    }


def test_every_rejection_names_the_rule_that_decided():
    first, labels = wrong_on(100, range(20, 100)), np.repeat([0, 1], 200)
    champion = holdout(labels, wrong_on(400, range(0, 20), range(200, 260)), ["cat", "dog"])
    challenger = holdout(labels, wrong_on(400, range(0, 40), range(200, 220)), ["cat", "dog"])
    rejections = {
        "min_metric": decide(holdout(SKEWED, first, TEN), None, gate(min_metric=0.3)),
        "baseline_margin": decide(holdout(SKEWED, first, TEN), None, gate()),
        "min_delta": decide(challenger, champion, gate(min_delta=0.1)),
        "max_p_value": decide(challenger, champion, gate(max_p_value=0.01)),
        "max_class_recall_drop": decide(challenger, champion, gate()),
    }
    for name, d in rejections.items():
        assert not d.promote and d.rule.startswith("rejected: "), name
        assert named(d.rule) == {name}, d.rule


def test_results_of_different_holdouts_do_not_pair():
    champion = holdout(CYCLE, wrong_on(144), FOUR)
    challenger = holdout(CYCLE[:100], wrong_on(100), FOUR)
    with pytest.raises(ValueError, match="same holdout rows"):
        decide(challenger, champion, gate())


def _version(storage, v):
    storage.write_bytes(layout.version(v, "model.safetensors"), v.encode())


def test_rollback_walks_back_the_lineage(local_storage):
    for v in ("a", "b", "c"):
        _version(local_storage, v)
    with pytest.raises(RegistryError, match="no champion"):
        rollback(local_storage)
    promote(local_storage, "a", expected_etag=None, action="promote", reason="first")
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(local_storage)
    for v in ("b", "c"):
        _, etag = registry.read_champion(local_storage)
        promote(
            local_storage, v, expected_etag=etag, action="promote", reason="better", previous="x"
        )
    assert rollback(local_storage).version == "b"
    assert rollback(local_storage).version == "a"
    assert registry.read_champion(local_storage)[0].version == "a"
    records = registry.history(local_storage)
    assert [(r.action, r.version) for r in records] == [
        ("promote", "a"),
        ("promote", "b"),
        ("promote", "c"),
        ("rollback", "b"),
        ("rollback", "a"),
    ]
    assert lineage(records) == ["a"]


def test_two_promotions_racing_only_one_wins(local_storage):
    for v in ("left", "right"):
        _version(local_storage, v)
    promote(local_storage, "left", expected_etag=None, action="promote", reason="seed")
    _, etag = registry.read_champion(local_storage)
    start, results = threading.Barrier(2), {}

    def attempt(v):
        start.wait()
        try:
            promote(local_storage, v, expected_etag=etag, action="promote", reason="race")
            results[v] = "won"
        except PromotionLost:
            results[v] = "lost"

    # both read the same pointer etag, then race to replace it
    _version(local_storage, "third")
    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("right", "third")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["lost", "won"]
    winner = next(v for v, r in results.items() if r == "won")
    assert registry.read_champion(local_storage)[0].version == winner
    assert [r.version for r in registry.history(local_storage)] == ["left", winner]
