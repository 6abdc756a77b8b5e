"""Incremental sync of labeled/ from a real S3 endpoint into a local cache, then the index."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from darkroom.config import RetrainConfig
from darkroom.data import index as idx
from darkroom.data.fetch import load_manifest
from darkroom.data.index import rebuild_index
from darkroom.data.sync import sync_labeled, sync_prefix
from darkroom.storage import open_storage
from tests.conftest import INDEX_COLUMNS, png_bytes, write_digits
from tests.s3.conftest import list_keys

pytestmark = pytest.mark.s3


def _full(s3_env, key: str) -> str:
    return f"{s3_env['prefix']}/{key}"


def _body(s3_env, key: str) -> bytes:
    return (
        s3_env["client"].get_object(Bucket=s3_env["bucket"], Key=_full(s3_env, key))["Body"].read()
    )


def _files(root) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def digits_s3(s3_env):
    written = write_digits(open_storage(s3_env["uri"]), per_class=10, incoming=5)
    labeled = sorted(k for k in written if k.startswith("labeled/"))
    assert len(labeled) == 30
    return labeled


def test_first_sync_downloads_every_labeled_object(s3_env, digits_s3, tmp_path):
    cache = tmp_path / "cache"
    report, entries = sync_prefix(open_storage(s3_env["uri"]), "labeled/", cache)
    assert report.listed == 30
    assert report.new == report.listed
    assert (report.changed, report.removed, report.unchanged, report.refused, report.failed) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert sorted(entries) == digits_s3  # incoming/ is not part of labeled/
    listing = list_keys(s3_env["client"], s3_env["bucket"], _full(s3_env, "labeled/"))
    assert report.downloaded_bytes == sum(o["Size"] for o in listing.values())
    for key, entry in entries.items():
        path = cache / "objects" / key
        assert entry.path == str(path.resolve())
        assert path.read_bytes() == _body(s3_env, key)
        assert entry.etag == listing[_full(s3_env, key)]["ETag"].strip('"')
    assert sorted(load_manifest(cache, "labeled/")) == digits_s3


def test_resync_changes_removals_and_unsafe_keys(s3_env, digits_s3, tmp_path):
    client, bucket = s3_env["client"], s3_env["bucket"]
    storage = open_storage(s3_env["uri"])
    cache = tmp_path / "cache"
    first, _ = sync_prefix(storage, "labeled/", cache)
    assert first.new == 30

    again, _ = sync_prefix(storage, "labeled/", cache)
    assert again.unchanged == again.listed == 30
    assert (again.new, again.changed, again.removed, again.downloaded_bytes) == (0, 0, 0, 0)

    changed_key, gone_key = digits_s3[0], digits_s3[1]
    new_bytes = png_bytes(200, size=32)
    assert new_bytes != _body(s3_env, changed_key)
    client.put_object(Bucket=bucket, Key=_full(s3_env, changed_key), Body=new_bytes)
    client.delete_object(Bucket=bucket, Key=_full(s3_env, gone_key))
    report, entries = sync_prefix(storage, "labeled/", cache)
    assert report.changed == 1
    assert report.removed == 1
    assert report.new == 0
    assert report.unchanged == 28
    assert report.downloaded_bytes == len(new_bytes)
    assert (cache / "objects" / changed_key).read_bytes() == new_bytes
    assert not (cache / "objects" / gone_key).exists()
    assert gone_key not in entries
    assert gone_key not in load_manifest(cache, "labeled/")

    # A hostile key straight through boto3: it must never land outside the cache.
    evil = "labeled/0/../../../escape.png"
    client.put_object(Bucket=bucket, Key=_full(s3_env, evil), Body=png_bytes(7))
    assert _full(s3_env, evil) in list_keys(client, bucket)  # the server kept it verbatim
    before = _files(tmp_path)
    report, entries = sync_prefix(storage, "labeled/", cache)
    assert report.refused == 1
    assert report.refused_keys == [evil]
    assert report.unchanged == 29
    assert (report.new, report.changed, report.failed, report.downloaded_bytes) == (0, 0, 0, 0)
    assert evil not in entries
    after = _files(tmp_path)
    assert {f for f in after - before if not f.startswith("cache/")} == set()
    assert not any(p.name == "escape.png" for p in tmp_path.rglob("*"))


def test_rebuild_index_writes_snapshot_and_pointer_to_s3(s3_env, digits_s3, tmp_path):
    client, bucket = s3_env["client"], s3_env["bucket"]
    cache = tmp_path / "cache"
    storage = open_storage(s3_env["uri"])
    config = RetrainConfig(
        storage=s3_env["uri"], cache_dir=str(cache), train={"folds": 2, "seed": 0}
    )
    assert sync_labeled(storage, config).new == 30

    snap = rebuild_index(storage, config, "s3-test").snapshot
    keys = list_keys(client, bucket, _full(s3_env, "index/"))
    assert set(keys) == {_full(s3_env, f"index/{snap}.parquet"), _full(s3_env, "index/latest.json")}
    latest = json.loads(_body(s3_env, "index/latest.json"))
    assert latest["snapshot"] == snap
    assert latest["key"] == f"index/{snap}.parquet"
    assert latest["classes"] == ["0", "1", "2"]

    table = pq.read_table(io.BytesIO(_body(s3_env, f"index/{snap}.parquet")))
    assert table.column_names == idx.COLUMNS == INDEX_COLUMNS
    meta = json.loads(table.schema.metadata[b"darkroom"])
    assert meta["classes"] == ["0", "1", "2"]
    df = table.to_pandas()
    assert sorted(df["key"]) == digits_s3
    assert (df["status"] == "ok").all()
    assert set(df["split"]) <= {"train", "holdout"}
    train = df[df["split"] == "train"]
    assert set(train["fold"]) == {0, 1}
    assert (df.loc[df["split"] == "holdout", "fold"] == -1).all()
    assert (df["width"] == 32).all() and (df["height"] == 32).all()
    assert (df["format"] == "png").all()
    listing = list_keys(client, bucket, _full(s3_env, "labeled/"))
    for row in df.itertuples():
        obj = listing[_full(s3_env, row.key)]
        assert row.etag == obj["ETag"].strip('"')
        assert row.bytes == obj["Size"]
        assert row.label == row.key.split("/")[1]
        assert row.class_index == int(row.label)
    # The user's sources are untouched by indexing: still exactly the 30 + 5 images.
    assert len(list_keys(client, bucket, _full(s3_env, "labeled/"))) == 30
    assert len(list_keys(client, bucket, _full(s3_env, "incoming/"))) == 5

    # Same data again: the same snapshot id, no second snapshot file.
    assert rebuild_index(storage, config, "s3-test").snapshot == snap
    assert len(list_keys(client, bucket, _full(s3_env, "index/"))) == 2
