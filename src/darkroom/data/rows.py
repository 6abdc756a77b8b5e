"""Index rows: what describing each synced image finds (content hash, header, whether it
decodes), the checks that exclude a row (duplicates, conflicting labels, too few per class),
and the split and folds of the usable ones.

Row contract (see DESIGN.md): image_id, key, label, class_index, split, fold, width, height,
channels, format, bytes, etag, status, error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from darkroom import layout
from darkroom.data.fetch import CachedObject
from darkroom.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    UnreadableImage,
    check_decodable,
    check_pixels,
    read_header,
)
from darkroom.data.labels import DatasetError
from darkroom.data.progress import Progress

COLUMNS = [
    "image_id", "key", "label", "class_index", "split", "fold", "width", "height", "channels",
    "format", "bytes", "etag", "status", "error",
]  # fmt: skip
# What describing a file finds out (the rest of a row comes from the listing and the split).
DESCRIBED = ["image_id", "bytes", "width", "height", "channels", "format", "status", "error"]


def describe_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Hashes one file's bytes and reads its header; checks that it decodes (at reduced scale,
    see ``data.check_decodable``) unless the header shows more than ``max_pixels``. Never
    raises for a bad image: status says why ("unreadable", "too_large")."""
    raw = Path(path).read_bytes()
    row = {
        "image_id": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "width": -1,
        "height": -1,
        "channels": -1,
        "format": "",
        "status": "ok",
        "error": "",
    }
    try:
        header = read_header(raw)
        row.update(
            height=header.height,
            width=header.width,
            channels=header.channels,
            format=header.format.lower().replace("jpeg", "jpg"),  # the bytes', not the name's
        )
        check_pixels(header.width, header.height, max_pixels)
        check_decodable(raw, header)
    except UnreadableImage as e:
        row.update(status=e.status, error=e.reason)
    return row


def is_holdout(image_id: str, fraction: float) -> bool:
    """Holdout membership as a pure function of the content hash: stable as data grows."""
    return int(image_id[:8], 16) / 0x1_0000_0000 < fraction


def _unreadable_row(size: int, error: str) -> dict:
    return {
        "image_id": "",
        "bytes": size,
        "width": -1,
        "height": -1,
        "channels": -1,
        "format": "",
        "status": "unreadable",
        "error": error,
    }


def _reused_row(old, max_pixels: int) -> dict | None:
    """An earlier index's row for the same (key, etag), judged against today's pixel limit;
    None when the file must be read again (too large then, allowed now: never decoded)."""
    row = {c: getattr(old, c) for c in DESCRIBED}
    if row["status"] == "unreadable":
        return row
    try:
        check_pixels(row["width"], row["height"], max_pixels)
    except ImageTooLarge as e:
        return {**row, "status": e.status, "error": e.reason}
    if row["status"] == "too_large":
        return None
    return {**row, "status": "ok", "error": ""}  # exclusions are judged again on the new set


def describe_rows(
    objects: Mapping[str, CachedObject],
    labels: Mapping[str, str],
    previous: pd.DataFrame | None = None,
    progress: Progress = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> pd.DataFrame:
    """One row per synced object: content hash, size, dimensions, label and status."""
    reuse = {}
    if previous is not None and len(previous):
        reuse = {(r.key, r.etag): r for r in previous.itertuples(index=False)}
    rows = []
    for i, (key, obj) in enumerate(sorted(objects.items()), 1):
        old = reuse.get((key, obj.etag))
        try:
            row = _reused_row(old, max_pixels) if old is not None else None
            row = row or describe_image(obj.path, max_pixels)
        except OSError as e:
            row = _unreadable_row(obj.size, str(e))
        label = labels.get(key) or layout.label_from_key(key)
        row.update(key=key, etag=obj.etag, label=label or "")
        if row["status"] == "ok" and not label:
            row.update(status="unlabeled", error="no class folder and no entry in labels file")
        rows.append(row)
        if progress:
            progress(i, len(objects))
    return pd.DataFrame(rows, columns=["key", "etag", "label", *DESCRIBED])


def assign_splits(df: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, list[str]]:
    """Class indices (sorted class names) and the train/holdout split of the usable rows."""
    ok = df["status"] == "ok"
    classes = sorted(df.loc[ok, "label"].unique().tolist())
    class_to_index = {c: i for i, c in enumerate(classes)}
    df["class_index"] = df["label"].map(class_to_index).where(ok, -1).fillna(-1).astype("int64")
    held = df["image_id"].map(lambda h: is_holdout(h, holdout_fraction) if h else False)
    df["split"] = np.where(ok & held, "holdout", np.where(ok, "train", ""))
    return df, classes


def assign_folds(df: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    """Stratified folds of the train rows, in content-hash order so that the assignment
    does not depend on listing order."""
    df["fold"] = -1
    train = df.index[df["split"] == "train"]
    order = df.loc[train].sort_values("image_id").index
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(order)), df.loc[order, "class_index"])):
        df.loc[order[val_idx], "fold"] = k
    df["fold"] = df["fold"].astype("int64")
    return df


def build_index(
    objects: Mapping[str, CachedObject],
    *,
    labels: Mapping[str, str] | None = None,
    folds: int = 5,
    seed: int = 42,
    holdout_fraction: float = 0.1,
    previous: pd.DataFrame | None = None,
    progress: Progress = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    label_problems: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Index rows for the synced labeled images: describe, exclude, split, fold.

    Args:
        objects: synced objects under ``labeled/`` with local paths (and the images under
            ``incoming/`` that ``labels`` labels).
        labels: key -> label overrides (from a labels file); else the class folder.
        previous: an earlier index; rows with the same key and etag are reused, not re-decoded.
        max_pixels: images with more pixels (from the header) get status "too_large".
        label_problems: key -> (status, error) for images the labels file leaves in doubt.

    Returns:
        The index DataFrame (contract columns) and the class names in index order.

    Raises:
        DatasetError: fewer than two classes, or a class with fewer train images than folds.
    """
    df = describe_rows(objects, labels or {}, previous, progress, max_pixels)
    doubt = df["key"].isin((label_problems or {}).keys()) & (df["status"] == "ok")
    for i, column in enumerate(["status", "error"]):
        df.loc[doubt, column] = df.loc[doubt, "key"].map(lambda k, i=i: label_problems[k][i])
    df, classes = assign_splits(_mark_duplicates(df), holdout_fraction)
    _check_trainable(df, classes, folds)
    df = assign_folds(df, folds, seed)
    return df[COLUMNS].reset_index(drop=True), classes


def _mark_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """The same bytes twice would leak between folds: keep the first, flag the rest.
    The same bytes under two labels cannot be trusted at all."""
    ok = df["status"] == "ok"
    labels_per_id = df[ok].groupby("image_id")["label"].nunique()
    conflicting = df["image_id"].isin(labels_per_id[labels_per_id > 1].index) & ok
    df.loc[conflicting, ["status", "error"]] = [
        "conflicting_labels",
        "same image content under different labels",
    ]
    dup = (df["status"] == "ok") & df.duplicated("image_id", keep="first")
    first_key = df[df["status"] == "ok"].drop_duplicates("image_id").set_index("image_id")["key"]
    df.loc[dup, "status"] = "duplicate"
    df.loc[dup, "error"] = "same content as " + df.loc[dup, "image_id"].map(first_key)
    return df


def _check_trainable(df: pd.DataFrame, classes: list[str], folds: int) -> None:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(
            f"need at least 2 classes with usable images under labeled/<class>/, found {found}. "
            "Add images of another class (one folder per class) or a labels file."
        )
    counts = df[df["split"] == "train"]["label"].value_counts()
    small = {c: int(counts.get(c, 0)) for c in classes if counts.get(c, 0) < folds}
    if small:
        worst = min(small.values())
        detail = ", ".join(f"{c!r}: {n}" for c, n in sorted(small.items()))
        hint = f"or lower --folds to {worst}" if worst >= 2 else "or remove the class"
        raise DatasetError(
            f"{folds}-fold cross-validation needs at least {folds} training images per class; "
            f"too few in {detail}. Add images to labeled/<class>/ {hint}."
        )
