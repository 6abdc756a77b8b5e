"""Temperature scaling: recovering a known miscalibration, ECE by hand, and the holdout guard."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from darkroom.model.calibration import (
    Calibration,
    apply_temperature,
    calibrate,
    calibration_scores,
    fit_temperature,
    reliability,
    reliability_png,
)


def _problem(seed: int, scale: float, n: int = 2000, n_classes: int = 4):
    """Logits of a Gaussian problem times `scale`, labels drawn from the true probabilities.

    scale 1 is perfectly calibrated; scale > 1 overconfident; scale < 1 underconfident.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, 4)) * 1.5
    x = means[rng.integers(0, n_classes, n)] + rng.normal(size=(n, 4))
    logits = x @ means.T - 0.5 * (means**2).sum(axis=1)  # the exact log-posterior, up to a constant
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    # Inverse-CDF sampling of one label per row from its true distribution.
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits * scale, np.minimum(labels, n_classes - 1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_overconfident_logits_get_a_temperature_above_one_and_half_the_ece():
    logits, labels = _problem(0, scale=5.0)
    t = fit_temperature(_log_softmax(logits), labels)  # log-probabilities work as logits
    assert t > 1
    assert t == pytest.approx(5.0, rel=0.15)
    before = calibration_scores(apply_temperature(logits, 1.0), labels)
    after = calibration_scores(apply_temperature(logits, t), labels)
    assert after.ece <= before.ece / 2
    assert after.nll < before.nll
    assert after.brier < before.brier
    assert after.accuracy == before.accuracy


def test_underconfident_logits_get_a_temperature_below_one():
    logits, labels = _problem(1, scale=0.3)
    t = fit_temperature(logits, labels)
    assert t < 1
    assert t == pytest.approx(0.3, rel=0.15)


def test_temperature_never_changes_the_argmax():
    logits, _ = _problem(2, scale=3.0, n=500)
    for t in (0.05, 0.5, 1.0, 7.0, 20.0):
        probs = apply_temperature(logits, t)
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert (probs.argmax(axis=1) == logits.argmax(axis=1)).all()


def test_identity_temperature_returns_the_probabilities():
    probs = np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]])
    np.testing.assert_allclose(apply_temperature(np.log(probs), 1.0), probs, rtol=1e-6)


def test_probabilities_of_exactly_zero_stay_finite():
    probs = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.4], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 2, 1, 0])  # the last row puts all its mass on the wrong class
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    t = fit_temperature(log_probs, labels)
    assert math.isfinite(t) and 0.05 <= t <= 20.0
    assert np.isfinite(apply_temperature(log_probs, t)).all()
    assert math.isfinite(calibration_scores(probs, labels).nll)


def test_scores_by_hand():
    # bins=2: (0, 0.5] and (0.5, 1]. Confidences 0.9 right, 0.8 wrong, 0.6 right -> upper bin,
    # accuracy 2/3 against mean confidence 23/30; 0.5 right -> lower bin (edges belong below).
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.5, 0.25, 0.25]])
    labels = np.array([0, 1, 1, 0])
    s = calibration_scores(probs, labels, bins=2)
    ece = 3 / 4 * abs(2 / 3 - 23 / 30) + 1 / 4 * abs(1 - 0.5)
    assert s.ece == pytest.approx(ece)
    assert s.nll == pytest.approx(
        -(math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.5)) / 4
    )
    brier = (0.01 + 0.01) + (0.64 + 0.81 + 0.01) + (0.04 + 0.16 + 0.04) + (0.25 + 0.0625 * 2)
    assert s.brier == pytest.approx(brier / 4)
    assert s.accuracy == 0.75 and s.n == 4
    bins = reliability(probs, labels, bins=2)
    assert bins.count.tolist() == [1, 3]
    np.testing.assert_allclose(bins.accuracy, [1, 2 / 3])
    np.testing.assert_allclose(bins.confidence, [0.5, 23 / 30])
    # 15 bins: 0.9 and 0.8 fall in different bins, so the ECE changes; empty bins weigh nothing.
    assert calibration_scores(probs, labels).ece == pytest.approx((0.1 + 0.8 + 0.4 + 0.5) / 4)


def test_holdout_guard_keeps_identity_when_the_holdout_gets_worse():
    oof, oof_labels = _problem(3, scale=5.0)
    holdout, holdout_labels = _problem(4, scale=0.5, n=1000)  # already underconfident
    c = calibrate(oof, oof_labels, holdout, holdout_labels)
    assert c.fitted_temperature > 3
    assert c.kept_identity
    assert c.temperature == 1.0
    assert "holdout NLL rose" in c.reason
    assert c.holdout_after.nll > c.holdout_before.nll


def test_holdout_that_agrees_lets_the_temperature_through():
    oof, oof_labels = _problem(5, scale=4.0)
    holdout, holdout_labels = _problem(6, scale=4.0, n=1000)
    c = calibrate(oof, oof_labels, holdout, holdout_labels)
    assert not c.kept_identity
    assert c.temperature == c.fitted_temperature > 2
    assert c.holdout_after.ece < c.holdout_before.ece
    assert c.oof_after.ece <= c.oof_before.ece / 2


def test_without_holdout_the_fit_is_applied_and_the_dict_round_trips():
    oof, oof_labels = _problem(7, scale=2.0, n=500)
    c = calibrate(oof, oof_labels)
    assert not c.kept_identity and c.holdout_before is None and c.holdout_after is None
    assert "no holdout" in c.reason
    d = json.loads(json.dumps(c.as_dict()))
    assert d["temperature"] == c.temperature and d["holdout_after"] is None
    assert Calibration.from_dict(d) == c
    with pytest.raises(ValueError):
        calibrate(oof, oof_labels, holdout_log_probs=oof)


def test_predictions_without_enough_mistakes_fit_no_temperature():
    """All right (one fold of easy data): the NLL would fall all the way to the lower bound."""
    oof, oof_labels = _problem(9, scale=2.0, n=300)
    right = oof.argmax(axis=1) == oof_labels
    few_wrong = right | (np.cumsum(~right) <= 4)  # every right row and 4 mistakes
    c = calibrate(oof[few_wrong], oof_labels[few_wrong], oof, oof_labels)
    assert c.temperature == c.fitted_temperature == 1.0 and c.kept_identity
    assert "only 4 mistakes" in c.reason
    assert c.holdout_after == c.holdout_before
    enough = right | (np.cumsum(~right) <= 5)
    assert calibrate(oof[enough], oof_labels[enough]).fitted_temperature != 1.0


def test_reliability_png_is_a_png_and_closes_its_figure():
    logits, labels = _problem(8, scale=5.0, n=500)
    t = fit_temperature(logits, labels)
    before = reliability(apply_temperature(logits, 1.0), labels)
    after = reliability(apply_temperature(logits, t), labels)
    png = reliability_png(before, after, "fold 0")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert plt.get_fignums() == []
