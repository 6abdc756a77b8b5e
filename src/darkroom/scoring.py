"""The scoring stage: which incoming (key, etag) pairs no model has scored, in chunks, and one
prediction file per chunk under ``predictions/<version>/``.

A chunk's file is named by a hash of its (key, etag) pairs, so a rerun of the same chunk
writes the same file instead of a duplicate. Planning needs no torch (the watcher plans too);
only ``score_chunk`` loads a model, through ``inference``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.storage import ObjectInfo, Storage
from darkroom.sync import SyncReport, fetch_objects, is_image_key

log = logging.getLogger(__name__)
PREDICTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("etag", pa.string()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("low_confidence", pa.bool_()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_probs", pa.list_(pa.float32())),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


def chunk_id(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, etag in sorted(pairs):
        h.update(f"{key}\x1f{etag}\x1e".encode())
    return h.hexdigest()[:20]


def scored_pairs(storage: Storage, version: str | None) -> set[tuple[str, str]]:
    """(key, etag) pairs that have a prediction row for ``version`` (None: any version)."""
    done: set[tuple[str, str]] = set()
    for obj in storage.list(layout.predictions(version)):
        if obj.key.endswith(".parquet"):
            t = storage.read_parquet(obj.key, columns=["key", "etag"])
            done.update(zip(t["key"], t["etag"], strict=True))
    return done


def plan_chunks(pending: Sequence[tuple[str, str]], chunk_size: int) -> list[list[tuple[str, str]]]:
    pending = sorted(pending)
    return [pending[i : i + chunk_size] for i in range(0, len(pending), chunk_size)]


def predictions_frame(
    version: str,
    classes: Sequence[str],
    items: Sequence[tuple[str, str]],
    probs: np.ndarray,
    ok: np.ndarray,
    errors: dict[str, str],
    options: ScoreConfig,
    statuses: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Prediction rows (the contract's columns), built column by column.

    Args:
        errors: key -> why the image could not be scored (its row's error).
        statuses: key -> the status of a refused image ("too_large"...); default "unreadable".
    """
    statuses = statuses or {}
    classes = np.asarray(classes)
    keys = [k for k, _ in items]
    good = ok.astype(bool) & np.array([k not in errors for k in keys], dtype=bool)
    k = min(options.topk, len(classes))
    order = np.argsort(-probs, axis=1)[:, :k]
    top_p = np.take_along_axis(probs, order, 1).astype(np.float32)
    conf = np.where(good, top_p[:, 0] if k else 0.0, np.nan)
    frame = pd.DataFrame(
        {
            "key": keys,
            "etag": [e for _, e in items],
            "label": pd.Series(classes[order[:, 0]], dtype=object).where(good, None),
            "confidence": pd.Series(conf, dtype="float32").where(good, None),
            "low_confidence": pd.Series(conf < options.low_confidence, dtype=object).where(
                good, None
            ),
            "topk_labels": [
                classes[o].tolist() if g else [] for o, g in zip(order, good, strict=True)
            ],
            "topk_probs": [p.tolist() if g else [] for p, g in zip(top_p, good, strict=True)],
            "model_version": version,
            "scored_at": datetime.now(UTC),
            "status": [
                "ok" if g else statuses.get(key, "unreadable")
                for key, g in zip(keys, good, strict=True)
            ],
            "error": [
                "" if g else errors.get(key, "could not decode the image")
                for key, g in zip(keys, good, strict=True)
            ],
        }
    )
    return frame


def write_predictions(storage: Storage, version: str, cid: str, df: pd.DataFrame) -> str:
    key = layout.predictions(version, cid)
    storage.write_parquet(key, df, schema=PREDICTION_SCHEMA)
    return key


def read_predictions(storage: Storage, version: str) -> pd.DataFrame:
    frames = [
        storage.read_parquet(o.key)
        for o in storage.list(layout.predictions(version))
        if o.key.endswith(".parquet")
    ]
    if not frames:
        return PREDICTION_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


# ---- the scoring stage: what the scoring tasks run ---------------------------------------


@dataclass
class ScorePlan:
    """The chunks of one scoring run and the counts behind them."""

    chunks: list[list[tuple[str, str]]]
    incoming: int
    already_scored: int
    to_score: int


@dataclass
class ChunkResult:
    chunk_id: str
    key: str
    images: int
    failed: int
    low_confidence: int
    per_class: dict[str, int] = field(default_factory=dict)


def pending_chunks(
    storage: Storage, version: str, chunk_size: int, rescore: bool = False
) -> ScorePlan:
    """Incoming (key, etag) pairs to score, in deterministic chunks.

    New images are those no model version has scored yet; with ``rescore``, every pair that
    ``version`` itself has not scored (older versions' predictions stay as they are).
    """
    listed = [(o.key, o.etag) for o in storage.list(layout.INCOMING) if is_image_key(o.key)]
    done = scored_pairs(storage, version)
    if not rescore:
        done |= scored_pairs(storage, None)
    pending = [p for p in listed if p not in done]
    return ScorePlan(
        plan_chunks(pending, chunk_size), len(listed), len(listed) - len(pending), len(pending)
    )


def score_chunk(
    storage: Storage, config: ScoreConfig, version: str, items: Sequence[tuple[str, str]]
) -> ChunkResult:
    """Scores one chunk and writes ``predictions/<version>/<chunk_id>.parquet`` atomically
    (the same chunk always gets the same name, so a retry replaces, never duplicates)."""
    from darkroom.inference import load_version  # torch only where a model runs

    items = [tuple(p) for p in items]
    cid = chunk_id(items)
    objs = [ObjectInfo(k, 0, e, datetime.now(UTC)) for k, e in items]
    report = SyncReport(prefix=layout.INCOMING)
    local = fetch_objects(storage, objs, config.cache_path(storage), report)
    errors = {k: "could not fetch the object" for k in report.failed_keys + report.refused_keys}
    paths = [local[k].path if k in local else "" for k, _ in items]
    loaded = load_version(storage, version, config.device)
    pred = loaded.predict(
        paths, config.batch_size, config.num_workers, config.tta, config.max_image_pixels
    )
    rows = zip(items, pred.status, pred.errors, strict=True)
    refused = [(k, s, e) for (k, _), s, e in rows if s != "ok"]
    errors = {k: e for k, _, e in refused} | errors  # a failed fetch is the first cause
    statuses = {k: s for k, s, _ in refused}
    frame = predictions_frame(
        version, loaded.classes, items, pred.probs, pred.ok, errors, config, statuses
    )
    key = write_predictions(storage, version, cid, frame)
    return ChunkResult(
        chunk_id=cid,
        key=key,
        images=len(items),
        failed=int((frame["status"] != "ok").sum()),
        low_confidence=int(frame["low_confidence"].fillna(False).astype(bool).sum()),
        per_class={str(c): int(n) for c, n in frame["label"].value_counts().items()},
    )
