"""The labeled index: one Parquet snapshot per distinct dataset, plus a ``latest.json`` pointer.

The rows (see DESIGN.md's contract, and ``darkroom.data.rows`` for how they are made) live in
the snapshot; class names, in index order, in the Parquet schema metadata under ``darkroom``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data import labels as labels_file
from darkroom.data.fetch import (
    CachedObject,
    SyncReport,
    fetch_objects,
    load_manifest,
    save_manifest,
)
from darkroom.data.labels import DatasetError
from darkroom.data.names import is_image_key
from darkroom.data.progress import Progress
from darkroom.data.rows import COLUMNS, build_index
from darkroom.data.sync import check_complete, load_refused
from darkroom.storage import Storage

log = logging.getLogger(__name__)

NUMERIC_DEFAULTS = ["class_index", "fold", "width", "height", "channels"]
# The cache manifest of the images under incoming/ that the labels file labels.
LABELED_INCOMING_MANIFEST = "labels/incoming/"


def read_label_file(storage: Storage) -> dict[str, str]:
    """Labels from ``labels.parquet`` or ``labels.csv`` at the root (columns key, label); a
    key the file gives two labels is left out (``labels.read_labels`` says which)."""
    return labels_file.read_labels(storage).labels


def snapshot_id(df: pd.DataFrame, classes: list[str]) -> str:
    """Content address of the index: same images, labels and splits, same id."""
    h = hashlib.sha256(json.dumps(classes).encode())
    cols = ["image_id", "key", "label", "split", "fold", "status"]
    for row in df[cols].itertuples(index=False):
        h.update("\x1f".join(map(str, row)).encode() + b"\x1e")
    return h.hexdigest()[:16]


def write_index(storage: Storage, df: pd.DataFrame, classes: list[str], **info) -> dict:
    """Writes the snapshot (once: snapshots are immutable), then the pointer."""
    snap = snapshot_id(df, classes)
    key = layout.index_snapshot(snap)
    counts = df["status"].value_counts().to_dict()
    meta = {
        "snapshot": snap,
        "classes": classes,
        "created_at": datetime.now(UTC).isoformat(),
        "rows": len(df),
        "status_counts": counts,
        **info,
    }
    if not storage.exists(key):
        storage.write_parquet(key, df, meta=meta)
    pointer = {
        "snapshot": snap,
        "key": key,
        "classes": classes,
        "rows": len(df),
        "status_counts": counts,
        "updated_at": meta["created_at"],
    }
    storage.write_json(layout.INDEX_LATEST, pointer)
    return pointer


class Snapshot(NamedTuple):
    rows: pd.DataFrame
    classes: list[str]
    snapshot: str


def read_index(storage: Storage, snapshot: str | None = None) -> Snapshot:
    """Reads a snapshot (default: the latest)."""
    if snapshot is None:
        pointer = storage.read_json(layout.INDEX_LATEST, missing_ok=True)
        if pointer is None:
            raise FileNotFoundError(
                f"no index at {storage.url(layout.INDEX_LATEST)}: run a retrain first"
            )
        snapshot = pointer["snapshot"]
    df = storage.read_parquet(layout.index_snapshot(snapshot))
    return Snapshot(df, df.attrs["darkroom"]["classes"], snapshot)


def summarize(df: pd.DataFrame) -> IndexSummary:
    ok = df[df["status"] == "ok"]
    return IndexSummary(
        images=len(df),
        usable=len(ok),
        train=int((ok["split"] == "train").sum()),
        holdout=int((ok["split"] == "holdout").sum()),
        classes=int(ok["label"].nunique()),
        excluded={
            k: int(v) for k, v in df.loc[df["status"] != "ok", "status"].value_counts().items()
        },
    )


@dataclass
class IndexSummary:
    images: int
    usable: int
    train: int
    holdout: int
    classes: int
    excluded: dict[str, int] = field(default_factory=dict)


@dataclass
class IndexResult:
    """What the index stage wrote: the snapshot, its pointer's facts and a summary."""

    snapshot: str
    key: str
    classes: list[str]
    rows: int
    summary: IndexSummary
    quarantine: str | None = None


def require_labeled(storage: Storage) -> None:
    """Raises DatasetError when ``labeled/`` holds no image at all."""
    if not any(is_image_key(o.key) for o in storage.list(layout.LABELED)):
        raise DatasetError(
            f"no images under {storage.url(layout.LABELED)}: add them as "
            f"{layout.LABELED}<class>/<name>.jpg (one folder per class), or fix --storage"
        )


def rebuild_index(
    storage: Storage, config: RetrainConfig, run_name: str, progress: Progress = None
) -> IndexResult:
    """The index stage: indexes the synced labeled images and the images under incoming/ that
    the labels file labels (reusing the previous snapshot's rows for unchanged objects), writes the snapshot, the pointer and a quarantine report of
    unusable images, of objects the sync refused and of labels-file rows naming no object."""
    cache = config.cache_path(storage.uri)
    objects = load_manifest(cache, layout.LABELED)
    if not objects:
        require_labeled(storage)  # says what to do when labeled/ is empty
    previous = None
    with contextlib.suppress(FileNotFoundError):
        previous = read_index(storage).rows
    file = labels_file.read_labels(storage)
    labels_file.check_spellings(file, filter(None, map(layout.label_from_key, objects)))
    objects = {**objects, **labeled_incoming(storage, config, file.keys_under(layout.INCOMING))}
    cfg = config.train
    df, classes = build_index(
        objects,
        labels=file.labels,
        folds=cfg.folds,
        seed=cfg.seed,
        holdout_fraction=config.holdout_fraction,
        previous=previous,
        progress=progress,
        max_pixels=config.max_image_pixels,
        label_problems=file.problems(),
    )
    info = {"folds": cfg.folds, "seed": cfg.seed, "holdout_fraction": config.holdout_fraction}
    pointer = write_index(storage, df, classes, **info)
    refused = load_refused(cache, layout.LABELED)
    extra = [{"key": k, "label": "", **why} for k, why in sorted(refused.items())]
    extra += file.missing(objects.keys() | refused.keys())
    summary = summarize(df)
    summary.excluded = dict(Counter(summary.excluded) + Counter(r["status"] for r in extra))
    quarantine = _write_quarantine(storage, run_name, df[df["status"] != "ok"], extra)
    return IndexResult(pointer["snapshot"], pointer["key"], classes, len(df), summary, quarantine)


def labeled_incoming(
    storage: Storage, config: RetrainConfig, keys: list[str]
) -> dict[str, CachedObject]:
    """The images under incoming/ that the labels file names (people's answers), in the cache
    beside the synced labeled images (a local root is read in place): they join the index as
    labeled images. Only what changed since the last index is downloaded.

    Raises:
        SyncIncomplete: more of them failed to download than ``config.max_failed_fraction``.
    """
    wanted = {k for k in keys if is_image_key(k)}
    if not wanted:
        return {}
    cache = config.cache_path(storage.uri)
    old = load_manifest(cache, LABELED_INCOMING_MANIFEST)
    listed = [o for o in storage.list(layout.INCOMING) if o.key in wanted]
    kept = {
        o.key: old[o.key]
        for o in listed
        if o.key in old and old[o.key].etag == o.etag and Path(old[o.key].path).exists()
    }
    report = SyncReport(prefix=layout.INCOMING, listed=len(listed))
    todo = [o for o in listed if o.key not in kept]
    fetched = fetch_objects(storage, todo, cache, report, config.download_concurrency)
    check_complete(report, storage.url(layout.INCOMING), config.max_failed_fraction)
    entries = {**kept, **fetched}
    save_manifest(cache, LABELED_INCOMING_MANIFEST, entries)
    return entries


def _write_quarantine(storage: Storage, run: str, bad: pd.DataFrame, extra: list[dict]):
    """Writes the quarantine report, if any: unusable index rows, then ``extra`` rows (things
    that never became an index row) with the other columns at their empty values."""
    empty = {c: "" for c in COLUMNS} | dict.fromkeys(NUMERIC_DEFAULTS, -1) | {"bytes": 0}
    rows = pd.DataFrame([{**empty, **r} for r in extra], columns=COLUMNS)
    frames = [f.astype({c: "int64" for c in NUMERIC_DEFAULTS}) for f in (bad, rows) if len(f)]
    if frames:
        storage.write_parquet(layout.quarantine(run), pd.concat(frames, ignore_index=True))
    return layout.quarantine(run) if frames else None
