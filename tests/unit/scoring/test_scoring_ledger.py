"""The scoring ledger: planning reads it instead of the predictions, a root written without it
is planned right (and recorded once), and merging its parts never loses a row."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.scoring import chunks as scoring
from darkroom.scoring import ledger
from darkroom.scoring.chunks import PREDICTION_SCHEMA, write_predictions
from darkroom.scoring.plan import chunk_id, pending_chunks
from darkroom.storage import LocalStorage
from tests.conftest import png_bytes

CLASSES = ["0", "1", "2"]


class CountingStorage(LocalStorage):
    """A local root that counts the predictions files it reads."""

    def __init__(self, root):
        super().__init__(root)
        self.prediction_reads = 0

    def read_bytes(self, key: str) -> bytes:
        self.prediction_reads += key.startswith(layout.PREDICTIONS)
        return super().read_bytes(key)


@pytest.fixture
def storage(tmp_path) -> CountingStorage:
    return CountingStorage(tmp_path / "bucket")


def rows(version: str, pairs):
    probs = np.random.default_rng(len(pairs)).dirichlet(np.ones(3), len(pairs)).astype("f4")
    ok = np.ones(len(pairs), bool)
    return scoring.predictions_table(version, CLASSES, pairs, probs, ok, {}, ScoreConfig())


def old_darkroom_writes(storage, version, pairs) -> str:
    """A predictions file as darkroom wrote it before the ledger: no ledger part."""
    key = layout.predictions(version, chunk_id(pairs))
    storage.write_parquet(key, rows(version, pairs), schema=PREDICTION_SCHEMA)
    return key


def incoming(storage, n: int) -> list[tuple[str, str]]:
    for i in range(n):
        storage.put_source_object(f"incoming/{i:02d}.png", png_bytes(value=i))
    return sorted((o.key, o.etag) for o in storage.list(layout.INCOMING))


def test_a_root_without_a_ledger_is_planned_from_its_predictions_once(storage):
    pairs = incoming(storage, 6)
    old_darkroom_writes(storage, "v1", pairs[:2])
    old_darkroom_writes(storage, "v2", pairs[2:3])
    plan = pending_chunks(storage, "v2", 10)
    assert plan.chunks == [pairs[3:]] and (plan.already_scored, plan.to_score) == (3, 3)
    assert storage.prediction_reads == 2  # each file once, to build the ledger
    assert {o.key for o in storage.list(layout.LEDGER_PARTS)} == {
        layout.ledger_part(layout.predictions(v, chunk_id(p)))
        for v, p in (("v1", pairs[:2]), ("v2", pairs[2:3]))
    }
    again = pending_chunks(storage, "v2", 10)
    assert again.chunks == [pairs[3:]] and storage.prediction_reads == 2  # the ledger only
    rescore = pending_chunks(storage, "v2", 10, rescore=True)
    assert rescore.chunks == [pairs[:2] + pairs[3:]]  # v1's pairs: not scored by v2


def test_a_run_stopped_between_its_two_writes_scores_nothing_twice(storage, monkeypatch):
    pairs = incoming(storage, 4)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between the predictions and the ledger")

    with monkeypatch.context() as m:
        m.setattr(ledger, "record", killed)
        with pytest.raises(KeyboardInterrupt):
            write_predictions(storage, "v1", chunk_id(pairs[:2]), rows("v1", pairs[:2]))
    assert storage.exists(layout.predictions("v1", chunk_id(pairs[:2])))
    assert not list(storage.list(layout.LEDGER))
    storage.put_source_object("incoming/new.png", png_bytes(value=99))
    plan = pending_chunks(storage, "v1", 2)
    planned = [p for c in plan.chunks for p in c]
    assert [k for k, _ in planned] == ["incoming/02.png", "incoming/03.png", "incoming/new.png"]


def test_a_deleted_or_rewritten_predictions_file_no_longer_counts(storage):
    pairs = incoming(storage, 4)
    first = write_predictions(storage, "v1", chunk_id(pairs[:2]), rows("v1", pairs[:2]))
    write_predictions(storage, "v1", chunk_id(pairs[2:]), rows("v1", pairs[2:]))
    assert pending_chunks(storage, "v1", 10).to_score == 0
    storage.delete(first)  # the user removed a file: its images are unscored again
    assert pending_chunks(storage, "v1", 10).chunks == [pairs[:2]]
    # rewritten outside darkroom with one row fewer (new etag, stale ledger part)
    key = layout.predictions("v1", chunk_id(pairs[2:]))
    storage.write_parquet(key, rows("v1", pairs[3:]), schema=PREDICTION_SCHEMA)
    assert pending_chunks(storage, "v1", 10).chunks == [pairs[:3]]


def test_parts_are_merged_into_one_file_without_losing_a_row(storage, monkeypatch):
    monkeypatch.setattr(ledger, "MERGE_PARTS", 3)
    pairs = [(f"incoming/{i:03d}.png", f"e{i}") for i in range(40)]
    for i in range(0, 20, 4):
        write_predictions(storage, "v1", chunk_id(pairs[i : i + 4]), rows("v1", pairs[i : i + 4]))
    assert ledger.scored(storage).pairs() == set(pairs[:20])
    (merged,) = [o.key for o in storage.list(layout.LEDGER)]
    assert merged.startswith(layout.LEDGER_MERGED)

    for i in range(20, 40, 4):
        write_predictions(storage, "v2", chunk_id(pairs[i : i + 4]), rows("v2", pairs[i : i + 4]))

    def killed(self, key):
        raise OSError("killed once the merged file was written")

    with monkeypatch.context() as m:
        m.setattr(LocalStorage, "delete", killed)
        with pytest.raises(OSError, match="killed"):
            ledger.scored(storage)
    assert len(list(storage.list(layout.LEDGER_MERGED))) == 2  # both merged files, and parts
    seen = ledger.load(storage)  # rows in two files are counted once
    assert sum(t.num_rows for t in seen.tables) == 40 and seen.needs_merge()
    assert ledger.scored(storage).pairs() == set(pairs)
    assert ledger.scored(storage, "v2").pairs() == set(pairs[20:])
    (merged,) = [o.key for o in storage.list(layout.LEDGER)]
    assert len(storage.read_parquet(merged)) == 40


def test_lookups_agree_with_a_python_set_across_segments(monkeypatch):
    monkeypatch.setattr(ledger, "_SEGMENT_ROWS", 50)
    rng = random.Random(0)
    keys = [f"incoming/{rng.choice('abc')}/{i:04d}.png" for i in range(300)]
    pairs = [(k, f"etag{rng.randrange(3)}") for k in keys]
    bounds = [0, 60, 120, 180, 240, 270, 300]  # four tables searched as they are, two pooled
    tables = [
        ledger.ledger_rows("v", f"predictions/v/{a}.parquet", "x", *zip(*pairs[a:b], strict=True))
        for a, b in itertools.pairwise(bounds)
    ]
    tables[0] = tables[0].sort_by([("etag", "descending")])  # an unsorted table is sorted
    scored = ledger.Scored(tables)
    assert len(scored.segments) == 5 and len(scored) == 300
    probes = pairs + [(k, "other") for k in keys[:50]] + [("incoming/zzz.png", "etag0")]
    rng.shuffle(probes)
    truth = set(pairs)
    for size in (1, 7, 64, len(probes)):
        for i in range(0, len(probes), size):
            batch = sorted(probes[i : i + size])
            assert scored.contains(batch) == [p in truth for p in batch]
    assert ledger.Scored([]).contains(probes[:3]) == [False] * 3
