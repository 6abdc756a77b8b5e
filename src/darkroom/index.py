"""The labeled index: one Parquet snapshot per distinct dataset, plus a ``latest.json`` pointer.

Row contract (see DESIGN.md): image_id, key, label, class_index, split, fold, width, height,
channels, format, bytes, etag, status, error. Class names, in index order, live in the Parquet
schema metadata under ``darkroom``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import StratifiedKFold

from darkroom.storage import Storage
from darkroom.sync import CachedObject

log = logging.getLogger(__name__)

LABELED = "labeled/"
INDEX_PREFIX = "index/"
LATEST = "index/latest.json"
META_KEY = b"darkroom"
COLUMNS = [
    "image_id",
    "key",
    "label",
    "class_index",
    "split",
    "fold",
    "width",
    "height",
    "channels",
    "format",
    "bytes",
    "etag",
    "status",
    "error",
]


class DatasetError(ValueError):
    """The labeled data cannot be trained on as it is; the message says what to fix."""


def describe_image(path: str | Path) -> dict:
    """Hashes and decodes one file once. Never raises for a bad image: status says why."""
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
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED) if raw else None
    if img is None:
        row.update(status="unreadable", error="OpenCV could not decode the file")
        return row
    row.update(
        height=int(img.shape[0]),
        width=int(img.shape[1]),
        channels=1 if img.ndim == 2 else int(img.shape[2]),
        format=Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg"),
    )
    return row


def is_holdout(image_id: str, fraction: float) -> bool:
    """Holdout membership as a pure function of the content hash: stable as data grows."""
    return int(image_id[:8], 16) / 0x1_0000_0000 < fraction


def read_label_file(storage: Storage) -> dict[str, str]:
    """Labels from ``labels.parquet`` or ``labels.csv`` at the root (columns key, label)."""
    for name in ("labels.parquet", "labels.csv"):
        if not storage.exists(name):
            continue
        raw = io.BytesIO(storage.read_bytes(name))
        df = pd.read_parquet(raw) if name.endswith(".parquet") else pd.read_csv(raw, dtype=str)
        if not {"key", "label"} <= set(df.columns):
            raise DatasetError(
                f"{storage.url(name)} needs the columns 'key' and 'label'; "
                f"it has {list(df.columns)}"
            )
        df = df.dropna(subset=["key", "label"])  # a blank cell is no override, not "nan"
        keys = [k if k.startswith(LABELED) else LABELED + k for k in df["key"].astype(str)]
        return dict(zip(keys, df["label"].astype(str), strict=True))
    return {}


def label_from_key(key: str) -> str | None:
    parts = key[len(LABELED) :].split("/")
    return parts[0] if len(parts) > 1 else None


def build_index(
    objects: Mapping[str, CachedObject],
    *,
    labels: Mapping[str, str] | None = None,
    folds: int = 5,
    seed: int = 42,
    holdout_fraction: float = 0.1,
    previous: pd.DataFrame | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Builds index rows for the synced labeled images.

    Args:
        objects: synced objects under ``labeled/`` with local paths.
        labels: key -> label overrides (from a labels file); else the class folder.
        previous: an earlier index; rows with the same key and etag are reused, not re-decoded.

    Returns:
        The index DataFrame (contract columns) and the class names in index order.

    Raises:
        DatasetError: fewer than two classes, or a class with fewer train images than folds.
    """
    labels = labels or {}
    reuse = {}
    if previous is not None and len(previous):
        reuse = {(r.key, r.etag): r for r in previous.itertuples(index=False)}
    rows = []
    for i, (key, obj) in enumerate(sorted(objects.items()), 1):
        old = reuse.get((key, obj.etag))
        if old is not None:
            row = {
                c: getattr(old, c)
                for c in (
                    "image_id",
                    "bytes",
                    "width",
                    "height",
                    "channels",
                    "format",
                    "status",
                    "error",
                )
            }
            if row["status"] not in ("ok", "unreadable"):
                row.update(status="ok", error="")  # re-judged below
        else:
            try:
                row = describe_image(obj.path)
            except OSError as e:
                row = {
                    "image_id": "",
                    "bytes": obj.size,
                    "width": -1,
                    "height": -1,
                    "channels": -1,
                    "format": "",
                    "status": "unreadable",
                    "error": str(e),
                }
        label = labels.get(key) or label_from_key(key)
        row.update(key=key, etag=obj.etag, label=label or "")
        if row["status"] == "ok" and not label:
            row.update(status="unlabeled", error="no class folder and no entry in labels file")
        rows.append(row)
        if progress:
            progress(i, len(objects))

    df = pd.DataFrame(
        rows, columns=[c for c in COLUMNS if c not in ("class_index", "split", "fold")]
    )
    df = _mark_duplicates(df)
    ok = df["status"] == "ok"
    classes = sorted(df.loc[ok, "label"].unique().tolist())
    class_to_index = {c: i for i, c in enumerate(classes)}
    df["class_index"] = df["label"].map(class_to_index).where(ok, -1).fillna(-1).astype("int64")
    df["split"] = np.where(
        ok & df["image_id"].map(lambda h: is_holdout(h, holdout_fraction) if h else False),
        "holdout",
        np.where(ok, "train", ""),
    )
    df["fold"] = -1
    _check_trainable(df, classes, folds)
    train = df.index[df["split"] == "train"]
    # Sort by content hash so fold assignment does not depend on listing order.
    order = df.loc[train].sort_values("image_id").index
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, val_idx) in enumerate(skf.split(np.zeros(len(order)), df.loc[order, "class_index"])):
        df.loc[order[val_idx], "fold"] = k
    df["fold"] = df["fold"].astype("int64")
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


def snapshot_id(df: pd.DataFrame, classes: list[str]) -> str:
    """Content address of the index: same images, labels and splits, same id."""
    h = hashlib.sha256(json.dumps(classes).encode())
    cols = ["image_id", "key", "label", "split", "fold", "status"]
    for row in df[cols].itertuples(index=False):
        h.update("\x1f".join(map(str, row)).encode() + b"\x1e")
    return h.hexdigest()[:16]


def to_parquet_bytes(df: pd.DataFrame, meta: dict) -> bytes:
    table = pa.Table.from_pandas(df, preserve_index=False)
    merged = {**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(merged), buf)
    return buf.getvalue()


def write_index(storage: Storage, df: pd.DataFrame, classes: list[str], **info) -> dict:
    """Writes the snapshot (once: snapshots are immutable), then the pointer."""
    snap = snapshot_id(df, classes)
    key = f"{INDEX_PREFIX}{snap}.parquet"
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
        storage.write_bytes(key, to_parquet_bytes(df, meta))
    pointer = {
        "snapshot": snap,
        "key": key,
        "classes": classes,
        "rows": len(df),
        "status_counts": counts,
        "updated_at": meta["created_at"],
    }
    storage.write_text(LATEST, json.dumps(pointer, indent=2))
    return pointer


def read_index(
    storage: Storage, snapshot: str | None = None
) -> tuple[pd.DataFrame, list[str], str]:
    """Reads a snapshot (default: the latest). Returns (rows, class names, snapshot id)."""
    if snapshot is None:
        if not storage.exists(LATEST):
            raise FileNotFoundError(f"no index at {storage.url(LATEST)}: run a retrain first")
        snapshot = json.loads(storage.read_text(LATEST))["snapshot"]
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{INDEX_PREFIX}{snapshot}.parquet")))
    meta = json.loads(table.schema.metadata[META_KEY])
    return table.to_pandas(), meta["classes"], snapshot


def summarize(df: pd.DataFrame) -> dict:
    ok = df[df["status"] == "ok"]
    return {
        "images": len(df),
        "usable": len(ok),
        "train": int((ok["split"] == "train").sum()),
        "holdout": int((ok["split"] == "holdout").sum()),
        "classes": int(ok["label"].nunique()),
        "excluded": df.loc[df["status"] != "ok", "status"].value_counts().to_dict(),
    }
