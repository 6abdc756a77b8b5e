"""The label-issue report of a candidate: which training images' labels look wrong, found by
confident learning (``label_issues``) on the folds' out-of-fold probabilities.

darkroom changes no label: the report names the image, its given label and the label the
models suggest; people decide (and answer through ``darkroom import-labels``). It is written to
``reports/label_issues/<version>.parquet`` with a contact sheet of the top images beside the
version (``label_issues.png``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from darkroom import layout
from darkroom.data.images import UnreadableImage, decode_rgb
from darkroom.storage import Storage
from darkroom.training import plots
from darkroom.training.label_issues import find_label_issues
from darkroom.training.records import LabelIssueSummary

SHEET_SIZE = 16  # images on the contact sheet
TOP_ROWS = 20  # rows the summary (and the UI's table) carries


def find_in_oof(oof: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, float]:
    """The ranked issues of out-of-fold rows (columns ``key``, ``class_index``, ``probs``) and
    the estimated share of wrong labels among them."""
    probs = np.stack(oof["probs"].to_numpy()).astype(np.float64)
    issues = find_label_issues(probs, oof["class_index"].to_numpy())
    return issues.to_frame(oof["key"].tolist(), classes), float(issues.noise_rate)


def write_label_issues(
    storage: Storage, version: str, oof: pd.DataFrame, classes: list[str]
) -> LabelIssueSummary:
    """Writes the report and the contact sheet; returns the summary."""
    frame, noise = find_in_oof(oof, classes)
    storage.write_parquet(layout.label_issues(version), frame)
    storage.write_bytes(
        layout.version(version, "label_issues.png"), contact_sheet(storage, frame.head(SHEET_SIZE))
    )
    top = frame.head(TOP_ROWS).to_dict("records")
    return LabelIssueSummary(version, len(oof), len(frame), noise, top)


def contact_sheet(storage: Storage, frame: pd.DataFrame) -> bytes:
    """The images of ``frame``'s rows, each captioned ``given → suggested``."""
    cells = []
    for r in frame.itertuples():
        try:
            image = decode_rgb(storage.read_bytes(r.key))
        except (FileNotFoundError, UnreadableImage):
            image = None  # a sheet without one picture beats no sheet
        caption = f"{r.given_label} → {r.suggested_label}\n(p given {r.self_confidence:.2f})"
        cells.append((image, caption))
    return plots.gallery_png(cells, "labels that look wrong (given → suggested)", "none found")


def read_label_issues(storage: Storage, version: str) -> pd.DataFrame:
    """A version's report (FileNotFoundError for a version trained without one)."""
    return storage.read_parquet(layout.label_issues(version))
