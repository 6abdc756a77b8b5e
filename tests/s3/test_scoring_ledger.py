"""The scoring ledger and prediction compaction on a real S3 endpoint (moto's server): the
etag a write returns is the one the listing shows, so a recorded file is never read again,
and a compacted version reads back with the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.scoring import chunks as scoring
from darkroom.scoring import compaction, ledger
from darkroom.scoring.chunks import PREDICTION_SCHEMA, read_predictions, write_predictions
from darkroom.scoring.plan import chunk_id, pending_chunks
from darkroom.storage import open_storage
from tests.conftest import png_bytes

pytestmark = pytest.mark.s3


def rows(version, pairs):
    probs = np.full((len(pairs), 2), 0.5, np.float32)
    ok = np.ones(len(pairs), bool)
    return scoring.predictions_table(version, ["a", "b"], pairs, probs, ok, {}, ScoreConfig())


def test_ledger_and_compaction_on_s3(s3_env, monkeypatch):
    storage = open_storage(s3_env["uri"])
    for i in range(6):
        storage.put_source_object(f"incoming/{i} é.png", png_bytes(value=i))
    pairs = sorted((o.key, o.etag) for o in storage.list(layout.INCOMING))
    # one file from before the ledger, two from this darkroom
    old = layout.predictions("v1", chunk_id(pairs[:1]))
    storage.write_parquet(old, rows("v1", pairs[:1]), schema=PREDICTION_SCHEMA)
    for part in (pairs[1:2], pairs[2:3]):
        write_predictions(storage, "v1", chunk_id(part), rows("v1", part))

    reads = []
    real = type(storage).read_bytes
    monkeypatch.setattr(
        type(storage), "read_bytes", lambda self, key: reads.append(key) or real(self, key)
    )
    plan = pending_chunks(storage, "v1", 10)
    assert plan.chunks == [pairs[3:]]
    assert [k for k in reads if k.startswith(layout.PREDICTIONS)] == [old]  # recorded once
    reads.clear()
    assert pending_chunks(storage, "v1", 10).chunks == [pairs[3:]]
    assert not [k for k in reads if k.startswith(layout.PREDICTIONS)]

    monkeypatch.setattr(ledger, "MERGE_PARTS", 1)
    assert ledger.scored(storage).pairs() == set(pairs[:3])
    assert [o.key[: len(layout.LEDGER_MERGED)] for o in storage.list(layout.LEDGER)] == [
        layout.LEDGER_MERGED
    ]
    before = read_predictions(storage, "v1").sort_values("key").reset_index(drop=True)
    result = compaction.compact_predictions(storage, "v1", rows_per_file=10)
    assert (result.files_before, result.files_after) == (3, 1)
    after = read_predictions(storage, "v1").sort_values("key").reset_index(drop=True)
    assert after[["key", "etag", "label"]].equals(before[["key", "etag", "label"]])
    assert pending_chunks(storage, "v1", 10).chunks == [pairs[3:]]
