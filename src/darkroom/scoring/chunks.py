"""The scoring stage: one prediction file per planned chunk (``darkroom.scoring.plan``) under
``predictions/<version>/``.

A chunk's file is named by a hash of its planned (key, etag) pairs, so a rerun of the same
chunk writes the same file instead of a duplicate. A pair whose object could not be fetched
gets no row (it is not scored, and the next run plans it again): its chunk's file holds the
other pairs only, and the next run puts the pair in a new chunk, with another id, that no
earlier file holds a row of. A pair fetched but undecodable gets its row once, with the reason.
Which pairs are scored comes from the scoring ledger (``darkroom.scoring.ledger``), which
``write_predictions`` adds to after each file, so planning never reads the predictions.
Only ``score_chunk`` loads a model (torch).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.data.fetch import CachedObject, SyncReport, cache_path, fetch_objects
from darkroom.data.names import UnsupportedFormat, is_unsupported_image
from darkroom.scoring import familiar, ledger
from darkroom.scoring.plan import chunk_id
from darkroom.storage import LocalStorage, ObjectInfo, Storage

if TYPE_CHECKING:
    import pandas as pd

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
        *familiar.COLUMNS,  # unfamiliar, knn_distance, embedding (darkroom.scoring.familiar)
    ]
)
# A remote chunk is fetched in slices of this many batches: the next slice downloads while
# this one is decoded and scored.
FETCH_SLICE_BATCHES = 4


def predictions_table(
    version: str,
    classes: Sequence[str],
    items: Sequence[tuple[str, str]],
    probs: np.ndarray,
    ok: np.ndarray,
    errors: Mapping[str, str],
    options: ScoreConfig,
    statuses: Mapping[str, str] | None = None,
    fam: familiar.Familiarity | None = None,
) -> pa.Table:
    """Prediction rows (the contract's columns, ``PREDICTION_SCHEMA``), built a column at a
    time from the whole probability matrix; only refused rows are visited one by one.

    Args:
        errors: key -> why the image could not be scored (its row's error).
        statuses: key -> the status of a refused image ("too_large"...); default "unreadable".
        fam: how familiar each image is to the version's reference (None: empty columns).
    """
    statuses = statuses or {}
    keys = pa.array([k for k, _ in items], pa.string())
    good = ok.astype(bool) & ~pc.is_in(keys, pa.array(list(errors), pa.string())).to_numpy(False)
    k = min(options.topk, len(classes))
    # stable: equal probabilities keep the classes' order, so a rerun writes the same rows
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, 1).astype(np.float32)
    names, bad = pa.array(list(classes), pa.string()), ~good
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(good, k, 0))]), pa.int32())
    status, error = np.full(len(items), "ok", object), np.full(len(items), "", object)
    for i in np.flatnonzero(bad):
        status[i] = statuses.get(items[i][0], "unreadable")
        error[i] = errors.get(items[i][0], "could not decode the image")
    columns = {
        "key": keys,
        "etag": pa.array([e for _, e in items], pa.string()),
        "label": names.take(pa.array(order[:, 0], mask=bad)),
        "confidence": pa.array(top[:, 0], mask=bad),
        "low_confidence": pa.array(top[:, 0] < options.low_confidence, mask=bad),
        "topk_labels": pa.ListArray.from_arrays(offsets, names.take(order[good].ravel())),
        "topk_probs": pa.ListArray.from_arrays(offsets, pa.array(top[good].ravel())),
        "model_version": pa.repeat(pa.scalar(version, pa.string()), len(items)),
        "scored_at": pa.repeat(pa.scalar(datetime.now(UTC), pa.timestamp("us", "UTC")), len(items)),
        "status": pa.array(status, pa.string()),
        "error": pa.array(error, pa.string()),
        **familiar.columns(fam, good),
    }
    return pa.Table.from_pydict(columns, schema=PREDICTION_SCHEMA)


def write_predictions(
    storage: Storage, version: str, cid: str, rows: pa.Table | pd.DataFrame
) -> str:
    """Writes one chunk's predictions file, then its part of the scoring ledger (a run
    stopped in between leaves a file that the next plan records: no pair is scored twice)."""
    key = layout.predictions(version, cid)
    etag = storage.write_parquet(key, rows, schema=PREDICTION_SCHEMA)
    ledger.record(storage, version, key, etag, rows)
    return key


def read_predictions(storage: Storage, version: str) -> pd.DataFrame:
    import pandas as pd

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
    result = ChunkResult(chunk_id(items), None, 0, 0, 0)
    cache_dir, loaded, parts, cached = config.cache_path(storage.uri), None, [], []
    reference = familiar.read_reference(storage, version) if config.drift.enabled else None
    for part, local, report in _fetch_ahead(storage, config, items, cache_dir):
        lost = set(report.failed_keys)
        result.unfetched += len(lost)
        result.unfetched_reasons |= {k: r for k, r in report.failed_reasons.items() if k in lost}
        rows = [p for p in part if p[0] not in lost]
        if rows:
            loaded = loaded or _load(storage, config, version)
            parts.append(
                _predict_part(loaded, reference, config, rows, local, report.refused_reasons)
            )
        cached.extend(local.values())
    if result.unfetched:
        log.warning(
            "chunk %s: %d of %d objects could not be fetched (left for a later run), e.g. %s",
            *(result.chunk_id, result.unfetched, len(items), _first(result.unfetched_reasons)),
        )
    if not parts:
        return result
    rows, probs, ok, errors, statuses, fam = _joined(parts)
    table = predictions_table(
        version, loaded.classes, rows, probs, ok, errors, config, statuses, fam
    )
    result.key = write_predictions(storage, version, result.chunk_id, table)
    _prune_cache(storage, cache_dir, cached)
    _tally(result, table)
    return result


def _first(reasons: Mapping[str, str]) -> str:
    return next((f"{k}: {v}" for k, v in sorted(reasons.items())), "no reason recorded")


def _fetch_ahead(
    storage: Storage, config: ScoreConfig, items: list[tuple[str, str]], cache_dir: Path
) -> Iterator[tuple[list[tuple[str, str]], dict[str, CachedObject], SyncReport]]:
    """``items`` in slices, each with its fetched objects and its own fetch report. A remote
    root's slices are a few batches, and a thread downloads the next slices while the caller
    scores this one; a local root is read in place, so its chunk is one slice."""
    local_root = isinstance(storage, LocalStorage)
    size = max(1, len(items) if local_root else FETCH_SLICE_BATCHES * config.batch_size)

    def fetch(part):
        report = SyncReport(prefix=layout.INCOMING)
        for key in (k for k, _ in part if is_unsupported_image(k)):  # never downloaded
            report.refuse(key, UnsupportedFormat(key))
        objs = [
            ObjectInfo(k, 0, e, datetime.now(UTC))
            for k, e in part
            if k not in report.refused_reasons
        ]
        local = fetch_objects(storage, objs, cache_dir, report, config.download_concurrency)
        return part, local, report

    with ThreadPoolExecutor(1, thread_name_prefix="darkroom-fetch") as pool:
        futures = [pool.submit(fetch, items[i : i + size]) for i in range(0, len(items), size)]
        try:
            for f in futures:
                yield f.result()
        finally:  # a chunk that fails stops fetching the rest
            for f in futures:
                f.cancel()


def _load(storage: Storage, config: ScoreConfig, version: str):
    from darkroom.model.inference import load_version  # torch only where a model runs

    return load_version(storage, version, config.device)


def _predict_part(loaded, reference, config: ScoreConfig, rows, local, refused: Mapping) -> tuple:
    """(rows, probs, ok, errors, statuses, familiarity) for fetched (or refused) pairs: a decoder's refusal
    is its row's status and error; an unsafe key, which no retry fixes, is unreadable; an
    image format darkroom does not read is unsupported_format, with what to convert it to."""
    paths = [local[k].path if k in local else "" for k, _ in rows]
    pred = loaded.predict(
        paths,
        config.batch_size,
        config.num_workers,
        config.tta,
        config.max_image_pixels,
        embed=reference is not None,
    )
    fam = None if reference is None else familiar.familiarity(reference, pred.embeddings)
    bad = [i for i, s in enumerate(pred.status) if s != "ok"]
    errors = {rows[i][0]: pred.errors[i] for i in bad}
    statuses = {rows[i][0]: pred.status[i] for i in bad}
    for key, why in refused.items():
        unsupported = why["status"] == UnsupportedFormat.status
        errors[key] = (
            why["error"] if unsupported else "refused: the key is not a safe relative path"
        )
        statuses[key] = why["status"] if unsupported else "unreadable"
    return rows, pred.probs, pred.ok, errors, statuses, fam


def _joined(parts: list[tuple]) -> tuple:
    """The slices' (rows, probs, ok, errors, statuses, familiarity) as one, in order."""
    rows, probs, ok, errors, statuses, fams = zip(*parts, strict=True)
    merge = lambda ds: {k: v for d in ds for k, v in d.items()}  # noqa: E731
    return (
        [p for r in rows for p in r],
        np.concatenate(probs),
        np.concatenate(ok),
        merge(errors),
        merge(statuses),
        familiar.joined(fams),
    )


def _tally(result: ChunkResult, table: pa.Table) -> None:
    """The chunk's counts, from its rows' columns."""
    result.images = table.num_rows
    result.failed = int(pc.sum(pc.not_equal(table["status"], "ok")).as_py() or 0)
    result.low_confidence = int(pc.sum(table["low_confidence"]).as_py() or 0)
    counts = pc.value_counts(pc.drop_null(table["label"]))
    result.per_class = dict(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
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
