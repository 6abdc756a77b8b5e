"""Prediction-file compaction: fewer, larger files with the same rows, no image scored twice,
and a compaction stopped half-way finished by the next one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from darkroom import layout
from darkroom.cli import main as cli
from darkroom.config import ScoreConfig
from darkroom.scoring import chunks as scoring
from darkroom.scoring import compaction
from darkroom.scoring.chunks import write_predictions
from darkroom.scoring.plan import chunk_id, pending_chunks
from darkroom.storage import LocalStorage
from tests.conftest import png_bytes

CLASSES = ["0", "1", "2"]


def score_one_by_one(storage, version: str, n: int) -> list[tuple[str, str]]:
    """``n`` real incoming images, each scored in a chunk of its own (one small file each);
    one of them unreadable, so nulls go through the merge too."""
    for i in range(n):
        storage.put_source_object(f"incoming/{i:02d}.png", png_bytes(value=i))
    pairs = sorted((o.key, o.etag) for o in storage.list(layout.INCOMING))
    rng = np.random.default_rng(0)
    for i, pair in enumerate(pairs):
        probs = rng.dirichlet(np.ones(3), 1).astype("f4")
        ok = np.array([i != 1])
        rows = scoring.predictions_table(version, CLASSES, [pair], probs, ok, {}, ScoreConfig())
        write_predictions(storage, version, chunk_id([pair]), rows)
    return pairs


def folder_rows(storage, version: str) -> list[tuple]:
    """Every row as ``pandas.read_parquet(predictions/<version>/)`` returns it, sorted."""
    df = pd.read_parquet(storage.root / layout.predictions(version))

    def plain(v):  # comparable values: lists as tuples, a missing value as None (NaN != NaN)
        if isinstance(v, np.ndarray):
            return tuple(v.tolist())
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    rows = df.astype(object).itertuples(index=False)
    return sorted((tuple(plain(v) for v in row) for row in rows), key=repr)


def files(storage, version: str) -> list[str]:
    return [o.key for o in storage.list(layout.predictions(version))]


def test_compaction_keeps_the_rows_and_scores_nothing_twice(local_storage):
    pairs = score_one_by_one(local_storage, "v1", 7)
    before = folder_rows(local_storage, "v1")
    result = compaction.compact_predictions(local_storage, "v1", rows_per_file=3)
    assert (result.files_before, result.files_after, result.rows_merged) == (7, 3, 6)
    assert len(files(local_storage, "v1")) == 3  # 3 + 3 rows merged, the last file alone
    assert folder_rows(local_storage, "v1") == before  # the same rows, none twice
    assert not list(local_storage.list(layout.COMPACTIONS))
    assert pending_chunks(local_storage, "v1", 10).to_score == 0
    local_storage.put_source_object("incoming/new.png", png_bytes(value=200))
    plan = pending_chunks(local_storage, "v1", 10)
    assert [k for c in plan.chunks for k, _ in c] == ["incoming/new.png"]
    again = compaction.compact_predictions(local_storage, "v1", rows_per_file=3)
    assert again.files_after == again.files_before == 3  # nothing small enough to pair up
    assert len(pairs) == 7


def test_a_compaction_stopped_half_way_is_finished_next_time(local_storage, monkeypatch):
    score_one_by_one(local_storage, "v1", 4)
    before = folder_rows(local_storage, "v1")

    def killed(self, key):
        raise OSError("killed after the merged file was written")

    with monkeypatch.context() as m:
        m.setattr(LocalStorage, "delete", killed)
        with pytest.raises(OSError, match="killed"):
            compaction.compact_predictions(local_storage, "v1", rows_per_file=10)
    assert len(files(local_storage, "v1")) == 5  # the merged file and its four sources
    assert pending_chunks(local_storage, "v1", 10).to_score == 0  # still nothing to score
    assert compaction.finish(local_storage) == 1
    assert len(files(local_storage, "v1")) == 1
    assert folder_rows(local_storage, "v1") == before


def test_the_compact_command(local_storage, capsys):
    score_one_by_one(local_storage, "v1", 4)
    argv = ["compact", "--storage", local_storage.uri]
    assert cli.main(argv) == 1  # no champion, no version named
    assert "name the version" in capsys.readouterr().err
    assert cli.main([*argv, "v1", "--rows", "0"]) == 1
    assert "rows_per_file must be at least 1" in capsys.readouterr().err
    assert cli.main([*argv, "v1", "--rows", "2"]) == 0
    assert "v1: 4 prediction files, now 2" in capsys.readouterr().out
    assert not local_storage.exists(layout.lease("score"))  # released
