"""The scoring stage: which incoming (key, etag) pairs no model has scored, in chunks, and one
prediction file per chunk under ``predictions/<version>/``.

A chunk's file is named by a hash of its planned (key, etag) pairs, so a rerun of the same
chunk writes the same file instead of a duplicate. A pair whose object could not be fetched
gets no row (it is not scored, and the next run plans it again): its chunk's file holds the
other pairs only, and the next run puts the pair in a new chunk, with another id, that no
earlier file holds a row of. A pair fetched but undecodable gets its row once, with the reason.
Planning needs no torch (the watcher plans too); only ``score_chunk`` loads a model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.storage import ObjectInfo, Storage
from darkroom.sync import CachedObject, SyncReport, cache_path, fetch_objects, is_image_key

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
    """What scoring one chunk did.

    Attributes:
        key: the prediction file written; None when no object of the chunk could be fetched.
        images: rows written (fetched pairs, decodable or not).
        failed: rows whose image could not be scored (status other than "ok").
        unfetched: pairs whose object could not be fetched: no row, a later run retries them.
        unfetched_reasons: key -> why, for the first few of them.
    """

    chunk_id: str
    key: str | None
    images: int
    failed: int
    low_confidence: int
    per_class: dict[str, int] = field(default_factory=dict)
    unfetched: int = 0
    unfetched_reasons: dict[str, str] = field(default_factory=dict)


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
    (the same chunk always gets the same name, so a retry replaces, never duplicates).

    Pairs whose object could not be fetched get no row and are counted in ``unfetched``; a
    chunk none of whose objects could be fetched writes no file. Once the file is written,
    the chunk's cached copies are deleted: the incoming cache holds at most the chunks in
    flight.
    """
    items = [tuple(p) for p in items]
    cid = chunk_id(items)
    cache_dir = config.cache_path(storage)
    report = SyncReport(prefix=layout.INCOMING)
    objs = [ObjectInfo(k, 0, e, datetime.now(UTC)) for k, e in items]
    local = fetch_objects(storage, objs, cache_dir, report)
    lost = set(report.failed_keys)
    rows = [p for p in items if p[0] not in lost]
    result = ChunkResult(cid, None, 0, 0, 0, unfetched=len(items) - len(rows))
    result.unfetched_reasons = {k: r for k, r in report.failed_reasons.items() if k in lost}
    if lost:
        log.warning(
            "chunk %s: %d of %d objects could not be fetched (left for a later run), e.g. %s",
            *(cid, len(items) - len(rows), len(items), _first(result.unfetched_reasons)),
        )
    if not rows:
        return result
    frame = _predict_rows(storage, config, version, rows, local, report.refused_keys)
    result.key = write_predictions(storage, version, cid, frame)
    _prune_cache(storage, cache_dir, local.values())
    result.images = len(frame)
    result.failed = int((frame["status"] != "ok").sum())
    result.low_confidence = int(frame["low_confidence"].fillna(False).astype(bool).sum())
    result.per_class = {str(c): int(n) for c, n in frame["label"].value_counts().items()}
    return result


def _first(reasons: Mapping[str, str]) -> str:
    return next((f"{k}: {v}" for k, v in sorted(reasons.items())), "no reason recorded")


def _predict_rows(
    storage: Storage,
    config: ScoreConfig,
    version: str,
    items: list[tuple[str, str]],
    local: Mapping[str, CachedObject],
    refused_keys: Sequence[str],
) -> pd.DataFrame:
    """Prediction rows for fetched (or refused) pairs: a decoder's refusal is its row's
    status and error; an unsafe key, which no retry fixes, is an unreadable row."""
    from darkroom.inference import load_version  # torch only where a model runs

    loaded = load_version(storage, version, config.device)
    paths = [local[k].path if k in local else "" for k, _ in items]
    pred = loaded.predict(
        paths, config.batch_size, config.num_workers, config.tta, config.max_image_pixels
    )
    refused = [(k, s, e) for (k, _), s, e in zip(items, pred.status, pred.errors, strict=True)]
    refused = [r for r in refused if r[1] != "ok"]
    errors = {k: e for k, _, e in refused}
    errors |= {k: "refused: the key is not a safe relative path" for k in refused_keys}
    statuses = {k: s for k, s, _ in refused}
    return predictions_frame(
        version, loaded.classes, items, pred.probs, pred.ok, errors, config, statuses
    )


def _prune_cache(storage: Storage, cache_dir: Path, cached: Iterable[CachedObject]) -> None:
    """Deletes darkroom's cached copies of scored objects. A local root is read in place
    (``local_path`` is not None): that file is the user's and is never touched; and only a
    path that is the key's own cache file is deleted, whatever the entry says."""
    for obj in cached:
        if storage.local_path(obj.key) is not None:
            continue
        path = cache_path(cache_dir, obj.key)
        if Path(obj.path).resolve() == path:
            path.unlink(missing_ok=True)
