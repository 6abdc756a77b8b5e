"""Scoring through objects that cannot be fetched: "could not fetch" is not "could not decode".

An object whose GET fails gets no prediction row, so the next run scores it; a broken file
gets its one unreadable row. No (key, etag, version) is ever written twice, and the incoming
cache is emptied once a chunk's file is written (a local root is read in place, untouched).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from darkroom.config import ScoreConfig
from darkroom.scoring.chunks import read_predictions, score_chunk
from darkroom.scoring.plan import pending_chunks
from darkroom.storage import open_storage
from darkroom.storage.s3 import S3Storage
from tests.conftest import TINY, train_candidate, write_digits

pytestmark = [pytest.mark.s3, pytest.mark.slow]

BROKEN = "incoming/broken.png"


def _setup(storage, cache_dir) -> tuple[str, dict[str, str]]:
    """A candidate trained on labeled digits, 8 digits and one non-image under incoming/.

    Returns the version and incoming key -> etag.
    """
    write_digits(storage, classes=("0", "1"), per_class=8, incoming=8)
    storage.put_source_object(BROKEN, b"not a png")
    version = train_candidate(storage, cache_dir, TINY)
    return version, {o.key: o.etag for o in storage.list("incoming/")}


def _score_all(storage, config, version) -> list:
    """Every pending chunk, concurrently as the flow runs them (and boto's backoff on the
    failing GETs is waited out once, not once per chunk)."""
    plan = pending_chunks(storage, version, config.chunk_size)
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda c: score_chunk(storage, config, version, c), plan.chunks))


def _files(storage, version) -> set[str]:
    return {o.key for o in storage.list(f"predictions/{version}/")}


def _cached_incoming(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*") if p.is_file() and "incoming" in p.parts]


def test_unfetched_objects_get_no_row_and_are_scored_by_the_next_run(s3_faulty, tmp_path):
    direct = S3Storage(s3_faulty["bucket"], s3_faulty["prefix"], client=s3_faulty["client"])
    storage, proxy, cache = open_storage(s3_faulty["uri"]), s3_faulty["proxy"], tmp_path / "c"
    version, incoming = _setup(direct, cache)
    assert len(incoming) == 9
    # Sorted, in chunks of 3: one lost object in each of two chunks.
    lost = ["incoming/new-1791.png", "incoming/new-1794.png"]
    proxy.fail_keys = {f"{s3_faulty['prefix']}/{k}": 500 for k in lost}
    config = ScoreConfig(storage=storage.uri, cache_dir=str(cache), device="cpu", chunk_size=3)

    results = _score_all(storage, config, version)
    assert [r.unfetched for r in results] == [0, 1, 1]
    assert sorted(k for r in results for k in r.unfetched_reasons) == lost
    assert all(v for r in results for v in r.unfetched_reasons.values())
    assert sum(r.images for r in results) == 7 and sum(r.failed for r in results) == 1
    first_files = _files(storage, version)
    assert first_files == {r.key for r in results}
    rows = read_predictions(storage, version).set_index("key")
    assert sorted(rows.index) == sorted(set(incoming) - set(lost))
    assert rows.loc[BROKEN, "status"] == "unreadable" and rows.loc[BROKEN, "error"]
    assert (rows.drop(BROKEN)["status"] == "ok").all()

    plan = pending_chunks(storage, version, config.chunk_size)
    assert plan.chunks == [[(k, incoming[k]) for k in lost]]
    # Still failing: a chunk none of whose objects could be fetched writes no file.
    again = score_chunk(storage, config, version, plan.chunks[0])
    assert (again.key, again.images, again.unfetched) == (None, 0, 2)
    assert _files(storage, version) == first_files

    proxy.fail_keys = {}
    results = _score_all(storage, config, version)
    assert [(r.images, r.unfetched, r.failed) for r in results] == [(2, 0, 0)]
    assert results[0].key not in first_files  # a new chunk, another id
    preds = read_predictions(storage, version)
    assert not preds.duplicated(["key", "etag", "model_version"]).any()
    assert dict(zip(preds["key"], preds["etag"], strict=True)) == incoming
    assert pending_chunks(storage, version, config.chunk_size).chunks == []
    assert _cached_incoming(cache) == []
    assert {f"{s3_faulty['prefix']}/{k}" for k in incoming} <= set(
        o["Key"]
        for o in s3_faulty["client"].list_objects_v2(Bucket=s3_faulty["bucket"])["Contents"]
    )


def test_scoring_a_local_root_deletes_nothing_under_incoming(local_storage, cache_dir):
    version, incoming = _setup(local_storage, cache_dir)
    folder = local_storage.root / "incoming"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    config = ScoreConfig(
        storage=local_storage.uri, cache_dir=str(cache_dir), device="cpu", chunk_size=4
    )
    results = _score_all(local_storage, config, version)
    assert sum(r.images for r in results) == 9 and not any(r.unfetched for r in results)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    preds = read_predictions(local_storage, version)
    assert dict(zip(preds["key"], preds["etag"], strict=True)) == incoming
    assert _cached_incoming(cache_dir) == []  # read in place: never copied
