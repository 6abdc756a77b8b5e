"""Prediction-file compaction: the many small files of ``predictions/<version>/`` (one per
scored chunk) merged into fewer large ones holding the same rows, so that readers
(``pandas.read_parquet(predictions/<version>/)``, DuckDB, Spark) open fewer files.

A merge writes, in order: a note of what it merges (``ledger/compactions/<version>/<name>.json``),
the merged predictions file, its ledger part; then it deletes the files it merged, then the
note. A reader in between may see the merged rows twice until the deletes are done; a merge
stopped half-way is finished by the next compaction or scoring run, which reads its note. The
scoring ledger covers every predictions file present at every step, so planning never takes a
merged pair for unscored, and no image is scored twice.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import pyarrow as pa

from darkroom import layout
from darkroom.scoring import ledger
from darkroom.scoring.chunks import PREDICTION_SCHEMA
from darkroom.storage import Storage

log = logging.getLogger(__name__)
ROWS_PER_FILE = 100_000  # rows a merged file reaches before the next one starts


@dataclass
class Compaction:
    """What one compaction of a version's predictions did."""

    version: str
    files_before: int
    files_after: int
    rows_merged: int = 0
    merged: list[str] = field(default_factory=list)  # the files written


def compact_predictions(
    storage: Storage, version: str, rows_per_file: int = ROWS_PER_FILE
) -> Compaction:
    """Merges ``version``'s prediction files of fewer than ``rows_per_file`` rows, in name
    order, into files of about ``rows_per_file`` rows (row counts come from the ledger, so
    only the files merged are read). Files of another schema (an older darkroom's) stay."""
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1 (got {rows_per_file})")
    finish(storage, version)
    counts = ledger.load(storage).rows_per_source()
    files = sorted(
        (o.key, o.etag)
        for o in storage.list(layout.predictions(version))
        if o.key.endswith(".parquet")
    )
    result = Compaction(version, len(files), len(files))
    group: list[tuple[str, str, pa.Table]] = []
    for key, etag in files:
        if counts.get(ledger.source(key, etag), rows_per_file) >= rows_per_file:
            continue  # large already (or unknown to the ledger: left alone)
        table = _read(storage, key)
        if table is not None:
            group.append((key, etag, table))
        if sum(t.num_rows for *_, t in group) >= rows_per_file:
            _merge(storage, version, group, result)
            group = []
    if len(group) > 1:
        _merge(storage, version, group, result)
    return result


def finish(storage: Storage, version: str | None = None) -> int:
    """Finishes merges that were stopped half-way (every version's, with None): deletes what
    a written merged file replaces. Returns how many notes were found."""
    notes = [o.key for o in storage.list(layout.COMPACTIONS) if o.key.endswith(".json")]
    if version is not None:
        notes = [k for k in notes if k.startswith(layout.compaction(version, ""))]
    for key in notes:
        log.info("finishing the prediction compaction noted in %s", key)
        _finish(storage, key)
    return len(notes)


def _read(storage: Storage, key: str) -> pa.Table | None:
    df = storage.read_parquet(key)
    if list(df.columns) != PREDICTION_SCHEMA.names:
        log.info("%s has other columns than this darkroom writes: left as it is", key)
        return None
    return pa.Table.from_pandas(df, schema=PREDICTION_SCHEMA, preserve_index=False)


def _merge(storage: Storage, version: str, group: list, result: Compaction) -> None:
    """One merged file from ``group`` ((key, etag, table) of each file), then the deletes."""
    if len(group) < 2:
        return
    sources = [ledger.source(key, etag) for key, etag, _ in group]
    name = "merged-" + hashlib.sha256("\n".join(sources).encode()).hexdigest()[:20]
    target = layout.predictions(version, name)
    note = layout.compaction(version, name)
    storage.write_json(note, {"merged": target, "sources": [[k, e] for k, e, _ in group]})
    table = pa.concat_tables([t for *_, t in group])
    etag = storage.write_parquet(target, table, schema=PREDICTION_SCHEMA)
    ledger.record(storage, version, target, etag, table)
    _finish(storage, note)
    result.files_after -= len(group) - 1
    result.rows_merged += table.num_rows
    result.merged.append(target)


def _finish(storage: Storage, note_key: str) -> None:
    """Deletes the files a written merged file replaces (unless rewritten since), then the
    note; a note whose merged file was never written is only deleted."""
    note = storage.read_json(note_key)
    if storage.exists(note["merged"]):
        for key, etag in note["sources"]:
            if key != note["merged"] and storage.etag(key) == etag:
                storage.delete(key)
    storage.delete(note_key)
