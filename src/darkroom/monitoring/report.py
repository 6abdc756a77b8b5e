"""The drift report of a scoring run, and of the day's runs together, against the champion's
reference: read back from the prediction rows the run wrote (their ``embedding`` and
``unfamiliar`` columns come from the same forward pass that scored them), written to
``reports/drift/<version>/<run>.json`` (+ ``.png``) and ``.../day-<date>.json``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.data.index import read_index
from darkroom.data.labels import read_labels
from darkroom.monitoring.drift import DriftReport, drift_png, drift_report
from darkroom.scoring.familiar import read_reference
from darkroom.storage import Storage

log = logging.getLogger(__name__)

COLUMNS = ["label", "confidence", "status", "embedding", "scored_at"]


@dataclass
class RunDrift:
    """A drift report as written, and where."""

    version: str
    run: str
    report: DriftReport
    url: str
    plot: str
    day: DriftReport | None = None  # the day's runs together
    labels_added: int = 0  # labeled images the champion was not trained on

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "run": self.run,
            "url": self.url,
            "plot": self.plot,
            "labels_added": self.labels_added,
            **self.report.as_dict(),
            "day": None if self.day is None else self.day.as_dict(),
        }


def run_drift(
    storage: Storage, config: ScoreConfig, version: str, files: list[str], run: str
) -> RunDrift | None:
    """The run's report (None when the version keeps no reference or nothing was scored)."""
    reference = read_reference(storage, version)
    if reference is None:
        log.info("%s keeps no reference (trained before references): no drift report", version)
        return None
    classes = storage.read_json(layout.version(version, "model.json"))["classes"]
    rows = _rows(storage, files)
    if rows.empty:
        return None
    report = _report(reference, classes, rows, config)
    stamp = datetime.now(UTC)
    day_rows = _rows(storage, _files_of_day(storage, version, stamp), stamp.date())
    day = _report(reference, classes, day_rows, config) if len(day_rows) else None
    drift = RunDrift(version, run, report, "", "", day)
    if report.drifted:
        drift.labels_added = labels_added(storage, version)
    _write(storage, drift, classes, f"day-{stamp.date().isoformat()}")
    return drift


def _report(reference, classes: list[str], rows: pd.DataFrame, config: ScoreConfig):
    index = {c: i for i, c in enumerate(classes)}
    report, _ = drift_report(
        reference,
        rows["label"].map(index).to_numpy(),
        rows["confidence"].to_numpy(),
        np.stack(rows["embedding"].to_numpy()),
        thresholds=config.drift,
        reduced=True,
    )
    return report


def _rows(storage: Storage, files: list[str], day=None) -> pd.DataFrame:
    """The scored rows (status ok, with an embedding) of ``files``; of ``day`` only, if given."""
    frames = [storage.read_parquet(k) for k in files]
    frames = [f[COLUMNS] for f in frames if set(COLUMNS) <= set(f.columns)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[(rows["status"] == "ok") & rows["embedding"].notna()]
    if day is not None:
        rows = rows[rows["scored_at"].dt.date == day]
    return rows


def _files_of_day(storage: Storage, version: str, stamp: datetime) -> list[str]:
    """The version's prediction files written on ``stamp``'s UTC day."""
    return [
        o.key
        for o in storage.list(layout.predictions(version))
        if o.key.endswith(".parquet") and o.last_modified.astimezone(UTC).date() == stamp.date()
    ]


def _write(storage: Storage, drift: RunDrift, classes: list[str], day_name: str) -> None:
    png = drift_png(drift.report, classes)
    storage.write_bytes(layout.drift_report(drift.version, drift.run, "png"), png)
    drift.plot = storage.url(layout.drift_report(drift.version, drift.run, "png"))
    key = layout.drift_report(drift.version, drift.run)
    drift.url = storage.url(key)
    storage.write_json(key, drift.as_dict())
    if drift.day is not None:
        storage.write_json(layout.drift_report(drift.version, day_name), drift.day.as_dict())


def labels_added(storage: Storage, version: str) -> int:
    """Labeled images (under labeled/, or named by the labels file) that the version's index
    snapshot does not hold: what an early retrain would add."""
    snapshot = storage.read_json(layout.version(version, "model.json"))["index_snapshot"]
    known = set(read_index(storage, snapshot)[0]["key"])
    listed = {o.key for o in storage.list(layout.LABELED)}
    named = set(read_labels(storage).labels)
    return len((listed | named) - known)
