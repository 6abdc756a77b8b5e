"""Confident learning: thresholds and joint checked by hand; labels flipped on purpose found."""

from __future__ import annotations

import numpy as np
import pytest

from darkroom.training.label_issues import (
    calibrate_joint,
    confident_joint,
    find_label_issues,
    per_class_thresholds,
)

# Dyadic values so every threshold and comparison below is exact in floating point.
#        p0     p1     p2     given
TINY = np.array(
    [
        [0.75, 0.125, 0.125],  # 0: confidently 0
        [0.5, 0.25, 0.25],  # 0: below every threshold -> not counted
        [0.25, 0.75, 0.0],  # 1: confidently 1
        [0.125, 0.5, 0.375],  # 1: below every threshold -> not counted
        [0.125, 0.125, 0.75],  # 2: confidently 2
        [0.625, 0.25, 0.125],  # 2: p0 == t0 exactly -> counted as a 0: the mislabelled row
    ]
)
TINY_LABELS = np.array([0, 0, 1, 1, 2, 2])


def test_thresholds_are_the_mean_self_confidence_per_class():
    # t0 = (0.75 + 0.5) / 2, t1 = (0.75 + 0.5) / 2, t2 = (0.75 + 0.125) / 2
    assert per_class_thresholds(TINY, TINY_LABELS).tolist() == [0.625, 0.625, 0.4375]


def test_a_class_nobody_is_labelled_with_is_never_confident():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    assert per_class_thresholds(probs, np.array([0, 1]))[2] == 1.0


def test_confident_joint_by_hand():
    assert confident_joint(TINY, TINY_LABELS).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_confident_joint_picks_the_argmax_among_classes_above_their_threshold():
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # argmax 0 misses t0 = 0.9; only class 1 reaches its bar
            [0.5, 0.2, 0.3],  # only class 2 reaches its bar
            [0.1, 0.5, 0.4],  # 1 and 2 both reach theirs: the larger wins
        ]
    )
    joint = confident_joint(probs, np.array([0, 1, 2]), thresholds=np.array([0.9, 0.3, 0.2]))
    assert joint.tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]


def test_calibrated_joint_rows_sum_to_the_label_counts_over_n():
    q = calibrate_joint(np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]]), np.array([2, 2, 2]))
    np.testing.assert_allclose(q, np.array([[2, 0, 0], [0, 2, 0], [1, 0, 1]]) / 6)
    # A label whose rows were never counted is taken as clean rather than dropped.
    q = calibrate_joint(np.array([[3, 1], [0, 0]]), np.array([4, 2]))
    np.testing.assert_allclose(q, np.array([[3, 1], [0, 2]]) / 6)


def test_tiny_example_flags_the_mislabelled_row():
    issues = find_label_issues(TINY, TINY_LABELS)
    assert issues.noise_rate == pytest.approx(1 / 6)
    # n * Q[2][0] = 1: the row labelled 2 with the largest p0 - p2.
    assert issues.index.tolist() == [5]
    assert issues.given.tolist() == [2]
    assert issues.suggested.tolist() == [0]
    assert issues.self_confidence.tolist() == [0.125]
    assert issues.suggested_confidence.tolist() == [0.625]
    assert issues.margin.tolist() == [0.5]


def test_frame_names_keys_and_classes_in_rank_order():
    probs = np.array(
        [[0.8, 0.2], [0.9, 0.1], [0.1, 0.9], [0.95, 0.05], [0.9, 0.1], [0.15, 0.85], [0.05, 0.95]]
    )
    labels = np.array([0, 0, 1, 1, 1, 1, 1])  # rows 3 and 4 look like cats
    issues = find_label_issues(probs, labels)
    # t = (0.85, 0.57): joint [[1, 0], [2, 3]], so n * Q[dog][cat] = 2 rows are flagged.
    frame = issues.to_frame([f"k{i}" for i in range(7)], ["cat", "dog"])
    assert list(frame.columns) == [
        "key", "given_label", "suggested_label", "self_confidence", "suggested_confidence",
        "margin", "rank",
    ]  # fmt: skip
    assert frame["key"].tolist() == ["k3", "k4"]  # p(dog) 0.05 is more suspicious than 0.1
    assert frame["given_label"].tolist() == ["dog", "dog"]
    assert frame["suggested_label"].tolist() == ["cat", "cat"]
    assert frame["rank"].tolist() == [1, 2]
    np.testing.assert_allclose(frame["margin"], [0.9, 0.8])
    with pytest.raises(ValueError):
        issues.to_frame(["only one key"], ["cat", "dog"])


def _out_of_fold_like(seed: int, n: int = 1000, n_classes: int = 5, flip: float = 0.05):
    """Gaussian classes in 8-d scored by a slightly wrong, slightly soft model (~98% accurate):
    the probabilities a decent classifier gives rows it did not train on."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, 8))
    means *= 4.5 / np.linalg.norm(means, axis=1, keepdims=True)
    truth = rng.integers(0, n_classes, n)
    x = means[truth] + rng.normal(size=(n, 8))
    fitted = means + rng.normal(scale=0.15, size=means.shape)
    logits = -0.5 * ((x[:, None, :] - fitted[None]) ** 2).sum(axis=-1) / 1.1
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    noisy = truth.copy()
    flipped = rng.choice(n, int(round(flip * n)), replace=False)
    noisy[flipped] = (truth[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    return probs, truth, noisy, flipped


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flipped_labels_lead_the_ranking(seed):
    probs, truth, noisy, flipped = _out_of_fold_like(seed)
    issues = find_label_issues(probs, noisy)
    top = issues.index[: len(flipped)]
    assert np.isin(top, flipped).mean() >= 0.7
    # The suggestion for a flipped row found is (nearly always) its true class.
    found = np.isin(issues.index, flipped)
    assert np.mean(issues.suggested[found] == truth[issues.index[found]]) >= 0.9
    assert 0.03 <= issues.noise_rate <= 0.1
    assert np.all(np.diff(issues.self_confidence) >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_labels_are_rarely_flagged(seed):
    probs, truth, _, _ = _out_of_fold_like(seed)
    issues = find_label_issues(probs, truth)
    assert len(issues.index) < 0.02 * len(truth)
    assert issues.noise_rate < 0.02


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        find_label_issues(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError):
        find_label_issues(np.array([[0.5, np.nan]]), np.array([0]))
    with pytest.raises(ValueError):
        find_label_issues(np.array([[0.5, 0.5]]), np.array([0, 1]))
