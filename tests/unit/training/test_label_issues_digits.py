"""Confident learning on real digits, trained for real: images filed under a wrong class folder
are found from the out-of-fold probabilities, and the digits left where they belong are hardly
ever flagged (the demo's own clean digits: tests/flows/test_drift.py).

The demo's recipe at a smaller size (600 labeled digits, 3 folds): the same folds, candidate
and label-issue report that a nightly retrain writes, through the core stages (no Prefect).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from darkroom.cli.demo import DEMO_TRAIN, digit_png
from darkroom.training.label_report import read_label_issues
from tests.conftest import train_candidate

PER_CLASS = 60
MOVED_SHARE = 0.05
RECIPE = DEMO_TRAIN.model_copy(update={"folds": 3, "epochs": 6})


def _write(storage, moved: int, seed: int = 0) -> dict[str, str]:
    """PER_CLASS digits of each class under labeled/<digit>/, ``moved`` of them (chosen at
    random) filed under another digit's folder. Returns key -> true digit of the moved ones."""
    digits = load_digits()
    keep = np.concatenate([np.flatnonzero(digits.target == c)[:PER_CLASS] for c in range(10)])
    rng = np.random.default_rng(seed)
    wrong = set(rng.choice(keep, size=moved, replace=False).tolist())
    moved_keys = {}
    for i in keep:
        true = int(digits.target[i])
        folder = (true + rng.integers(1, 10)) % 10 if i in wrong else true
        key = f"labeled/{folder}/digit-{i:04d}.png"
        storage.put_source_object(key, digit_png(digits.data[i], 32))
        if i in wrong:
            moved_keys[key] = str(true)
    return moved_keys


@pytest.mark.slow
def test_images_moved_to_a_wrong_folder_lead_the_report(local_storage, cache_dir):
    moved = _write(local_storage, round(MOVED_SHARE * 10 * PER_CLASS))
    version = train_candidate(local_storage, cache_dir, RECIPE)
    report = read_label_issues(local_storage, version)
    top = report.head(len(moved))
    found = set(top["key"]) & set(moved)
    assert len(found) >= 0.7 * len(moved), (len(found), len(moved), top.to_dict("records"))
    # the suggestion is the digit the image really shows, for most of those found
    right = sum(
        moved[k] == s for k, s in zip(top["key"], top["suggested_label"], strict=True) if k in moved
    )
    assert right >= 0.8 * len(found)
    # the images left where they belong are hardly ever flagged
    clean_flagged = len(set(report["key"]) - set(moved))
    assert clean_flagged < 0.02 * (10 * PER_CLASS - len(moved)), report.to_dict("records")
