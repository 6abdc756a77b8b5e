"""The scoring ledger: which (key, etag) pairs each model version has scored, known without
reading the predictions.

One row per prediction row: ``key``, ``etag``, ``model_version`` and ``source``, the
predictions file that holds the row, with that file's etag. Each predictions file gets one
small part, ``ledger/parts/<version>/<file>.parquet``, written right after it; when parts pile
up, a read merges them into one file under ``ledger/merged/``: the merged file is written
first, then the files it covers are deleted, so a reader sees every row at least once, and a
row seen twice (in a merged file and a part) is counted once.

The ledger is a cache of the predictions, checked on every read against their listing (names
and etags, no contents): a predictions file it does not cover (written by an earlier darkroom,
or by a run stopped between its two writes) is read once and recorded, and rows whose file is
gone or was rewritten are ignored (and dropped by the next merge). Whatever happens to the
ledger, a pair counts as scored only while a predictions file holds its row.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from darkroom import layout
from darkroom.storage import Storage

log = logging.getLogger(__name__)
_NAMES = pa.dictionary(pa.int32(), pa.string())  # few distinct values: versions, files
LEDGER_SCHEMA = pa.schema(
    [("key", pa.string()), ("etag", pa.string()), ("model_version", _NAMES), ("source", _NAMES)]
)
MERGE_PARTS = 64  # unmerged parts (one small read each) that make a read merge them
_SEGMENT_ROWS = 100_000  # a table this large is searched as it is; smaller ones are pooled
_READS = 3  # a file merged away between the listing and its read: list again
_SEP = "\x1f"  # between a key and its etag in a probe


def source(key: str, etag: str) -> str:
    """A predictions file as written: its key and etag (a rewritten file is another source)."""
    return f"{key}@{etag}"


def ledger_rows(version: str, file_key: str, file_etag: str, keys, etags) -> pa.Table:
    """The ledger rows of one predictions file, from its ``key`` and ``etag`` columns."""
    keys, etags = _strings(keys), _strings(etags)
    codes = np.zeros(len(keys), np.int32)
    const = lambda v: pa.DictionaryArray.from_arrays(codes, pa.array([v]))  # noqa: E731
    columns = [keys, etags, const(version), const(source(file_key, file_etag))]
    table = pa.Table.from_arrays(columns, schema=LEDGER_SCHEMA)
    return table.sort_by([("key", "ascending"), ("etag", "ascending")])


def record(storage: Storage, version: str, file_key: str, file_etag: str, rows) -> str:
    """Writes the ledger part of the predictions file ``file_key`` (written with etag
    ``file_etag``; ``rows``: its rows, any table with ``key`` and ``etag`` columns)."""
    part = layout.ledger_part(file_key)
    storage.write_parquet(
        part, ledger_rows(version, file_key, file_etag, rows["key"], rows["etag"])
    )
    return part


def _strings(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array(values)
    return values.cast(pa.string())


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """The ledger as read: its rows that match the predictions, one table per file read
    (merged files first), and what a merge would replace."""

    tables: list[pa.Table] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # ledger files whose rows are in tables
    merged: int = 0  # merged files among them
    trimmed: bool = False  # some rows were stale or seen twice

    @property
    def parts(self) -> int:
        return len(self.files) - self.merged

    def needs_merge(self) -> bool:
        return self.parts > MERGE_PARTS or self.merged > 1 or self.trimmed

    def rows_per_source(self) -> dict[str, int]:
        """Rows per predictions file (``source``), valid ones only."""
        out: dict[str, int] = {}
        for table in self.tables:
            for chunk in table["source"].chunks:
                counts = np.bincount(_codes(chunk), minlength=len(chunk.dictionary))
                for name, n in zip(chunk.dictionary.to_pylist(), counts.tolist(), strict=True):
                    if n:
                        out[name] = out.get(name, 0) + n
        return out


def load(storage: Storage) -> Ledger:
    """The ledger, checked against the predictions' listing; predictions files it does not
    cover are read once and recorded (their parts are written here)."""
    for attempt in range(1, _READS + 1):
        try:
            return _load(storage)
        except FileNotFoundError:  # a concurrent merge deleted what we listed
            if attempt == _READS:
                raise
            log.info("a ledger file was merged away while it was read: reading the ledger again")
    raise AssertionError("unreachable")


def _load(storage: Storage) -> Ledger:
    # The ledger is listed before the predictions: a part listed here has its file listed below.
    found = [o.key for o in storage.list(layout.LEDGER) if o.key.endswith(".parquet")]
    merged = [k for k in found if k.startswith(layout.LEDGER_MERGED)]
    parts = [k for k in found if k.startswith(layout.LEDGER_PARTS)]
    files = {
        source(o.key, o.etag): (o.key, o.etag)
        for o in storage.list(layout.PREDICTIONS)
        if o.key.endswith(".parquet")
    }
    ledger, covered = Ledger(merged=len(merged)), set()

    def fresh(name: str) -> bool:  # a current predictions file, not seen in an earlier table
        return name in files and name not in covered

    for key in merged + parts:
        rows = _read(storage, key)
        table, used = _keep(rows, fresh)
        ledger.trimmed |= table.num_rows < rows.num_rows
        covered |= used
        ledger.tables.append(table)
        ledger.files.append(key)
    missing = sorted(files.keys() - covered)
    if missing:
        log.info("ledger: recording %d predictions files it does not cover yet", len(missing))
    for name in missing:
        key, etag = files[name]
        ledger.tables.append(_record_existing(storage, key, etag))
        ledger.files.append(layout.ledger_part(key))
    return ledger


def _read(storage: Storage, key: str) -> pa.Table:
    # Arrow as stored: no pandas import, no Python object per row.
    return storage.read_table(key).cast(LEDGER_SCHEMA)


def _record_existing(storage: Storage, key: str, etag: str) -> pa.Table:
    """Records a predictions file that has no ledger rows: an earlier darkroom wrote it (no
    ledger then), or its run stopped before writing its part."""
    rows = storage.read_table(key, columns=["key", "etag"])
    table = ledger_rows(layout.predictions_version(key), key, etag, rows["key"], rows["etag"])
    storage.write_parquet(layout.ledger_part(key), table)
    return table


def _codes(chunk: pa.DictionaryArray) -> np.ndarray:
    return chunk.indices.to_numpy(zero_copy_only=False)


def _keep(table: pa.Table, keep: Callable[[str], bool]) -> tuple[pa.Table, set[str]]:
    """``table``'s rows whose source passes ``keep``, and the sources they come from."""
    masks, used = [], set()
    for chunk in table["source"].chunks:
        names, codes = chunk.dictionary.to_pylist(), _codes(chunk)
        present = np.bincount(codes, minlength=len(names)) > 0
        wanted = np.array([bool(p) and keep(n) for n, p in zip(names, present, strict=True)])
        used.update(n for n, w in zip(names, wanted, strict=True) if w)
        masks.append(wanted[codes] if len(names) else np.zeros(0, bool))
    mask = np.concatenate(masks) if masks else np.zeros(0, bool)
    return (table if mask.all() else table.filter(mask)), used


# ---- merging ---------------------------------------------------------------------------------


def merge(storage: Storage, ledger: Ledger) -> str:
    """Writes ``ledger``'s rows as one merged file, sorted by key, then deletes the files it
    replaces; a reader in between sees rows twice, never none. Returns the merged file's key."""
    table = pa.concat_tables(ledger.tables).unify_dictionaries().combine_chunks()
    table = table.sort_by([("key", "ascending"), ("etag", "ascending")])
    sources = sorted(ledger.rows_per_source())
    name = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:20]
    key = layout.ledger_merged(name)
    storage.write_parquet(key, table)
    for old in ledger.files:
        if old != key:
            storage.delete(old)
    log.info("ledger: merged %d files into %s (%d rows)", len(ledger.files), key, table.num_rows)
    ledger.tables, ledger.files, ledger.merged, ledger.trimmed = [table], [key], 1, False
    return key


def scored(storage: Storage, version: str | None = None) -> Scored:
    """The (key, etag) pairs that have a prediction row of ``version`` (None: of any version),
    from the ledger; merges its parts first when they have piled up."""
    ledger = load(storage)
    if ledger.needs_merge():
        merge(storage, ledger)
    tables = ledger.tables
    if version is not None:
        tables = [t.filter(pc.equal(t["model_version"], version)) for t in tables]
    return Scored(tables)


# ---- lookups ---------------------------------------------------------------------------------


class Scored:
    """A set of (key, etag) pairs held as sorted Arrow columns: a batch of listed pairs is
    looked up among the rows between its first and last key only, so planning costs the
    listing plus one pass over the ledger, whatever its size, and no Python object per row."""

    def __init__(self, tables: Iterable[pa.Table]):
        big, small = [], []
        for t in tables:
            (big if t.num_rows >= _SEGMENT_ROWS else small).append(t.select(["key", "etag"]))
        if small:
            big.append(pa.concat_tables(small))
        self.segments = [_sorted(t) for t in big if t.num_rows]

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self.segments)

    def contains(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """For each (key, etag) of ``pairs``, whether it is in the set."""
        if not pairs or not self.segments:
            return [False] * len(pairs)
        low, high = min(k for k, _ in pairs), max(k for k, _ in pairs)
        probe = pa.array([f"{k}{_SEP}{e}" for k, e in pairs], pa.string())
        hit = np.zeros(len(pairs), bool)
        for keys, etags in self.segments:
            lo = bisect.bisect_left(keys, low, key=_py)
            hi = bisect.bisect_right(keys, high, lo=lo, key=_py)
            if lo < hi:
                window = pc.binary_join_element_wise(keys[lo:hi], etags[lo:hi], _SEP)
                hit |= pc.is_in(probe, value_set=window).to_numpy(zero_copy_only=False)
        return hit.tolist()

    def pairs(self) -> set[tuple[str, str]]:
        """Every pair, as Python objects (for small sets: tests, reports)."""
        out: set[tuple[str, str]] = set()
        for keys, etags in self.segments:
            out.update(zip(keys.to_pylist(), etags.to_pylist(), strict=True))
        return out


def _py(scalar: pa.Scalar):
    return scalar.as_py()


def _sorted(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(keys, etags) sorted by key: a merged file is written sorted, and only checked."""
    table = table.combine_chunks()
    keys = table["key"].chunk(0) if table["key"].num_chunks else pa.array([], pa.string())
    if len(keys) > 1 and not pc.all(pc.greater_equal(keys[1:], keys[:-1])).as_py():
        table = table.sort_by([("key", "ascending"), ("etag", "ascending")]).combine_chunks()
        keys = table["key"].chunk(0)
    return keys, table["etag"].chunk(0)
