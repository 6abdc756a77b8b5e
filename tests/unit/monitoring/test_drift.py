"""Drift of a batch against a Reference, on a synthetic world whose truth is known: classes are
clusters in an 8-dimensional latent space seen through a 128-dimensional embedding, and the
confidences are calibrated (each prediction is right with the probability it states)."""

from __future__ import annotations

import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pytest

from darkroom.model.reference import build_reference
from darkroom.monitoring.drift import (
    DriftConfig,
    class_mix_test,
    drift_png,
    drift_report,
    mmd_test,
)

LATENT, WIDTH, CLASSES = 8, 128, 4


class World:
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(0, 3, (CLASSES, LATENT))
        self.view = rng.normal(0, 1, (LATENT, WIDTH)) / np.sqrt(LATENT)
        self.other_view = rng.normal(0, 1, (LATENT, WIDTH)) / np.sqrt(LATENT)

    def draw(self, n, seed, shift=0.0, mix=None, beta=(8, 2)):
        """(predicted classes, confidences, embeddings, whether each prediction is right)."""
        rng = np.random.default_rng(seed)
        classes = rng.choice(CLASSES, n, p=mix)
        latent = self.centres[classes] + rng.normal(0, 1, (n, LATENT)) + shift
        emb = latent @ self.view + rng.normal(0, 0.1, (n, WIDTH))
        conf = rng.beta(*beta, n)
        return classes, conf, emb, rng.random(n) < conf


@pytest.fixture(scope="module")
def world():
    w = World()
    classes, conf, emb, _ = w.draw(4000, seed=1)
    _, _, holdout, _ = w.draw(1000, seed=2)
    return w, build_reference(emb, holdout, classes, CLASSES, conf, dims=16, seed=0)


def test_a_batch_like_the_reference_is_ok_and_its_accuracy_is_estimated(world):
    w, ref = world
    classes, conf, emb, right = w.draw(2000, seed=3)
    report, unfamiliar = drift_report(ref, classes, conf, emb)
    assert report.verdict == "ok" and not report.drifted and report.reasons == []
    assert unfamiliar.dtype == bool and unfamiliar.shape == (2000,)
    assert report.unfamiliar_share == pytest.approx(unfamiliar.mean()) and unfamiliar.mean() < 0.03
    assert report.mmd_p > 0.01 and report.ks_p > 0.01 and report.js_distance < 0.05
    assert abs(report.expected_accuracy - right.mean()) < 0.03
    assert report.headline == report.expected_accuracy
    assert report.range_low <= report.expected_accuracy <= report.range_high


def test_a_shifted_batch_drifts_and_its_accuracy_range_opens(world):
    w, ref = world
    clean, _ = drift_report(ref, *w.draw(2000, seed=3)[:3])
    report, unfamiliar = drift_report(ref, *w.draw(2000, seed=4, shift=3.0)[:3])
    assert report.verdict == "drift" and report.drifted
    assert unfamiliar.mean() > 0.25 and report.mmd_p < 0.01
    assert report.range_low <= clean.expected_accuracy - 0.2
    assert report.headline == report.range_low
    assert report.range_high == pytest.approx(report.range_low + report.unfamiliar_share)
    text = " ".join(report.reasons)
    assert "unfamiliar" in text and "MMD" in text


def test_images_moving_into_directions_training_never_used_are_unfamiliar(world):
    w, ref = world
    classes, conf, emb, _ = w.draw(1000, seed=5)
    emb = emb + np.random.default_rng(6).normal(0, 1.5, (1000, LATENT)) @ w.other_view
    report, unfamiliar = drift_report(ref, classes, conf, emb)
    assert report.verdict == "drift" and unfamiliar.mean() > 0.5


def test_fewer_than_min_images_is_too_few_to_tell(world):
    w, ref = world
    report, unfamiliar = drift_report(ref, *w.draw(30, seed=7, shift=3.0)[:3])
    assert report.verdict == "too few to tell" and not report.drifted
    assert unfamiliar.mean() > 0.5  # the flags are still there for each image
    assert report.headline == report.expected_accuracy
    assert "30 images" in report.reasons[0]
    empty, flags = drift_report(ref, [], [], np.zeros((0, WIDTH)))
    assert empty.verdict == "too few to tell" and flags.shape == (0,)
    assert empty.mmd_p is None and empty.expected_accuracy is None


def test_a_changed_class_mix_moves_js_and_chi_square(world):
    w, ref = world
    report, _ = drift_report(ref, *w.draw(2000, seed=8, mix=[0.7, 0.1, 0.1, 0.1])[:3])
    assert report.js_distance > 0.1 and report.chi2_p < 0.01
    assert report.verdict == "drift" and any("class mix" in r for r in report.reasons)
    assert report.batch_mix[0] == pytest.approx(0.7, abs=0.03)


def test_a_class_the_reference_never_predicted_is_tested_without_dividing_by_zero():
    with np.errstate(all="raise"):
        p, js, mix = class_mix_test(
            np.array([0.5, 0.5, 0.0]), np.array([0] * 45 + [1] * 45 + [2] * 10)
        )
    assert p < 1e-6 and 0.1 < js < 1.0 and mix[2] == pytest.approx(0.1)
    p_same, js_same, _ = class_mix_test(np.array([0.5, 0.5, 0.0]), np.array([0] * 50 + [1] * 50))
    assert p_same > 0.5 and js_same == pytest.approx(0.0, abs=1e-6)


def test_shifted_confidences_move_ks_alone(world):
    w, ref = world
    classes, _, emb, _ = w.draw(2000, seed=9)
    conf = np.random.default_rng(10).beta(3, 2, 2000)
    report, _ = drift_report(ref, classes, conf, emb)
    assert report.ks_p < 0.01 and report.ks_statistic > 0.1
    assert report.reasons and all(r.startswith("confidences") for r in report.reasons)
    # Too small a change to matter: a significant p with a small statistic raises nothing.
    loose = DriftConfig(ks_statistic=1.0)
    assert drift_report(ref, classes, conf, emb, thresholds=loose)[0].verdict == "ok"


def test_mmd_is_fast_and_tells_a_shift_from_chance():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 64)), rng.normal(size=(500, 64))
    start = time.perf_counter()
    mmd2, p = mmd_test(x, y, permutations=200, seed=0)
    assert time.perf_counter() - start < 1.0
    assert p > 0.01 and abs(mmd2) < 0.01
    assert mmd_test(x, y + 0.3, seed=0)[1] < 0.01
    assert mmd_test(x, y, seed=0) == (mmd2, p)  # seeded


def test_the_report_is_json_and_a_png(world):
    w, ref = world
    report, _ = drift_report(ref, *w.draw(300, seed=11, shift=3.0)[:3])
    loaded = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert loaded["verdict"] == "drift" and len(loaded["knn_hist"]["batch"]) == 20
    assert sum(loaded["knn_hist"]["batch"]) == pytest.approx(1.0)
    png = drift_png(report, class_names=["a", "b", "c", "d"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and plt.get_fignums() == []


def test_mismatched_inputs_are_refused(world):
    w, ref = world
    classes, conf, emb, _ = w.draw(100, seed=12)
    with pytest.raises(ValueError, match="99 confidences"):
        drift_report(ref, classes, conf[:99], emb)
    with pytest.raises(ValueError, match="classes must lie"):
        drift_report(ref, classes + 4, conf, emb)


def test_a_report_on_2000_images_takes_well_under_a_second(world):
    w, ref = world
    batch = w.draw(2000, seed=13)[:3]
    start = time.perf_counter()
    drift_report(ref, *batch)
    assert time.perf_counter() - start < 1.0
