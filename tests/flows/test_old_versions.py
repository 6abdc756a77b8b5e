"""A version trained before darkroom's core became stage packages (and before temperatures)
still loads and scores: tests/fixtures/version-0.1.0-flat/ holds one, trained by the flat core
(commit 630e9a0) on 3 digit classes; its model.json has no calibration, so temperature 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.model.inference import load_version
from darkroom.registry import pointer
from darkroom.scoring.chunks import read_predictions
from flows.score import score_new_images
from tests.conftest import write_digits

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "version-0.1.0-flat"
VERSION = "66f3b5d9-eeaac0b7"


def test_a_version_trained_by_the_flat_core_scores_with_temperature_one(local_storage, cache_dir):
    shutil.copytree(FIXTURE / VERSION, local_storage.root / layout.version(VERSION))
    pointer.promote(
        local_storage, VERSION, expected_etag=None, action="promote", reason="kept from 0.1.0"
    )
    truth = write_digits(local_storage, per_class=0, incoming=40)
    scored = score_new_images(ScoreConfig(storage=local_storage.uri, cache_dir=str(cache_dir)))
    assert scored["version"] == VERSION and scored["scored"] == 40 and scored["failed"] == 0
    preds = read_predictions(local_storage, VERSION).sort_values("key")
    assert (preds["status"] == "ok").all()
    loaded = load_version(local_storage, VERSION, "cpu")
    assert loaded.temperature == 1.0 and "calibration" not in loaded.meta
    paths = [str(local_storage.local_path(k)) for k in preds["key"]]
    raw = loaded.predict(paths, calibrated=False).probs
    np.testing.assert_allclose(preds["confidence"], raw.max(1), atol=1e-5)
    known = [k for k in preds["key"] if truth[k] in ("0", "1", "2")]
    right = preds.set_index("key").loc[known, "label"] == [truth[k] for k in known]
    assert len(known) >= 8 and right.mean() >= 0.6  # it still knows its digits
