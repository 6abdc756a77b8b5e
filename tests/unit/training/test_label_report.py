"""The label-issue report of a candidate: written where the layout says, ranked, with a contact
sheet of the suspects; darkroom changes no label doing it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from darkroom import layout
from darkroom.cli.demo import digit_png
from darkroom.training.label_report import read_label_issues, write_label_issues


def _oof(n: int = 400, flipped: int = 20, seed: int = 0) -> tuple[pd.DataFrame, set[str]]:
    """Out-of-fold rows of a good 4-class model, with ``flipped`` labels moved on purpose."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4))
    logits[np.arange(n), truth] += 5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = truth.copy()
    moved = rng.choice(n, flipped, replace=False)
    given[moved] = (truth[moved] + 1) % 4
    keys = [f"labeled/{g}/{i}.png" for i, g in enumerate(given)]
    oof = pd.DataFrame({"key": keys, "class_index": given, "probs": list(probs)})
    return oof, {keys[i] for i in moved}


def test_the_report_ranks_the_moved_labels_first(local_storage):
    oof, moved = _oof()
    for key in oof["key"].head(20):
        local_storage.put_source_object(key, digit_png(np.full(64, 8.0), 32))
    labels_before = oof["class_index"].copy()
    summary = write_label_issues(local_storage, "v1", oof, ["a", "b", "c", "d"])
    report = read_label_issues(local_storage, "v1")
    top = set(report["key"].head(len(moved)))
    assert len(top & moved) >= 0.7 * len(moved)
    assert summary.count == len(report) and summary.examined == len(oof)
    assert 0.02 < summary.noise_rate < 0.1
    assert list(report["rank"]) == sorted(report["rank"])
    assert local_storage.exists(layout.label_issues("v1"))
    sheet = local_storage.read_bytes(layout.version("v1", "label_issues.png"))
    assert sheet.startswith(b"\x89PNG")
    assert oof["class_index"].equals(labels_before)  # the report changes no label
