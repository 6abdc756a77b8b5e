"""LocalStorage and open_storage: the storage contract on a real folder."""

from __future__ import annotations

import os

import pytest

from darkroom import storage as st
from darkroom.storage import (
    LocalStorage,
    PreconditionFailed,
    StorageError,
    UnsafeKeyError,
    check_key,
    open_storage,
)
from darkroom.storage import base as storage_base
from darkroom.storage.s3 import S3Storage

UNSAFE_KEYS = ["../x", "/abs", "a\\b", "a//b", "", "a/../b", "./a", "a/", "x\x00y"]


def test_write_read_exists_etag(local_storage):
    assert not local_storage.exists("models/a.json")
    assert local_storage.etag("models/a.json") is None
    etag = local_storage.write_bytes("models/a.json", b"hello")
    assert local_storage.read_bytes("models/a.json") == b"hello"
    assert local_storage.exists("models/a.json")
    assert local_storage.etag("models/a.json") == etag
    assert local_storage.read_text("models/a.json") == "hello"
    assert (local_storage.root / "models" / "a.json").read_bytes() == b"hello"
    assert not local_storage.exists("models")  # a folder is not an object


def test_read_missing_raises_file_not_found(local_storage):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        local_storage.read_bytes("nope.txt")


def test_text_round_trip_utf8(local_storage):
    local_storage.write_text("reports/é.txt", "naïve ✓")
    assert local_storage.read_text("reports/é.txt") == "naïve ✓"


def test_list_sorted_with_prefix_filter_and_sizes(local_storage):
    for key in ["b/2.txt", "a/1.txt", "b/1.txt", "ab/x.txt", "c.txt"]:
        local_storage.write_bytes(key, key.encode())
    assert [o.key for o in local_storage.list()] == [
        "a/1.txt",
        "ab/x.txt",
        "b/1.txt",
        "b/2.txt",
        "c.txt",
    ]
    assert [o.key for o in local_storage.list("b/")] == ["b/1.txt", "b/2.txt"]
    # A prefix is a string prefix, not a folder: "a" matches "a/..." and "ab/...".
    assert [o.key for o in local_storage.list("a")] == ["a/1.txt", "ab/x.txt"]
    assert [o.key for o in local_storage.list("a/")] == ["a/1.txt"]
    assert [o.key for o in local_storage.list("b/2")] == ["b/2.txt"]
    assert list(local_storage.list("missing/")) == []
    info = {o.key: o for o in local_storage.list()}
    assert info["b/2.txt"].size == len(b"b/2.txt")
    assert info["b/2.txt"].etag == local_storage.etag("b/2.txt")
    assert info["b/2.txt"].last_modified.tzinfo is not None


def test_list_skips_hidden_and_temp_files(local_storage):
    local_storage.write_bytes("d/real.txt", b"x")
    root = local_storage.root
    (root / "d" / ".real.txt.tmp-abc").write_bytes(b"partial")
    (root / "d" / ".hidden").write_bytes(b"h")
    (root / ".secret").mkdir()
    (root / ".secret" / "inside.txt").write_bytes(b"s")
    # Conditional writes leave lock files under .darkroom-locks: never listed.
    local_storage.write_bytes("d/cond.txt", b"c", if_none_match=True)
    assert (root / ".darkroom-locks").is_dir()
    assert [o.key for o in local_storage.list()] == ["d/cond.txt", "d/real.txt"]


def test_atomic_write_leaves_no_temp_files(local_storage):
    for i in range(3):
        local_storage.write_bytes("index/x.parquet", bytes([i]) * 100)
        local_storage.write_bytes("index/y.json", b"{}", if_none_match=(i == 0))
    names = sorted(p.name for p in (local_storage.root / "index").iterdir())
    assert names == ["x.parquet", "y.json"]
    assert local_storage.read_bytes("index/x.parquet") == bytes([2]) * 100


def test_failed_write_keeps_old_content_and_no_temp(local_storage, monkeypatch):
    local_storage.write_bytes("models/champion.json", b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage_base.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        local_storage.write_bytes("models/champion.json", b"new content")
    monkeypatch.undo()
    assert local_storage.read_bytes("models/champion.json") == b"old"
    assert [p.name for p in (local_storage.root / "models").iterdir()] == ["champion.json"]


@pytest.mark.parametrize("key", ["labeled/cat/1.png", "incoming/a.png", "labeled/x"])
def test_writes_to_sources_refused(local_storage, key):
    with pytest.raises(PermissionError):
        local_storage.write_bytes(key, b"x")
    with pytest.raises(PermissionError):
        local_storage.write_text(key, "x", if_none_match=True)
    assert not local_storage.exists(key)


def test_put_source_object_never_overwrites(local_storage):
    etag = local_storage.put_source_object("labeled/cat/1.png", b"first")
    assert local_storage.read_bytes("labeled/cat/1.png") == b"first"
    again = local_storage.put_source_object("labeled/cat/1.png", b"second, longer")
    assert again == etag
    assert local_storage.read_bytes("labeled/cat/1.png") == b"first"
    local_storage.put_source_object("incoming/new.png", b"n")
    assert local_storage.read_bytes("incoming/new.png") == b"n"


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_refused(local_storage, key):
    with pytest.raises(UnsafeKeyError):
        check_key(key)
    with pytest.raises(UnsafeKeyError):
        local_storage._path(key)
    with pytest.raises(UnsafeKeyError):
        local_storage.write_bytes(key, b"x")
    with pytest.raises(UnsafeKeyError):
        local_storage.put_source_object(key, b"x")
    with pytest.raises(UnsafeKeyError):
        local_storage.read_bytes(key)


def test_unsafe_write_creates_nothing_outside_root(tmp_path):
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(UnsafeKeyError):
        storage.write_bytes("../escaped.txt", b"x")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("key", ["a", "a/b/c.png", "labeled/cat/x y.jpg", "a.b/..c"])
def test_safe_keys_pass(key):
    assert check_key(key) == key


def test_if_none_match_on_existing_fails(local_storage):
    local_storage.write_bytes("models/p.json", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        local_storage.write_bytes("models/p.json", b"two", if_none_match=True)
    assert local_storage.read_bytes("models/p.json") == b"one"


def test_if_match_stale_fails_current_succeeds(local_storage):
    first = local_storage.write_bytes("models/champion.json", b"v1")
    second = local_storage.write_bytes("models/champion.json", b"v2", if_match=first)
    assert second != first
    assert local_storage.etag("models/champion.json") == second
    with pytest.raises(PreconditionFailed):
        local_storage.write_bytes("models/champion.json", b"v3", if_match=first)
    assert local_storage.read_bytes("models/champion.json") == b"v2"
    third = local_storage.write_bytes("models/champion.json", b"v3", if_match=second)
    assert third not in (first, second)
    assert local_storage.read_bytes("models/champion.json") == b"v3"


def test_if_match_on_missing_object_fails(local_storage):
    with pytest.raises(PreconditionFailed):
        local_storage.write_bytes("models/champion.json", b"x", if_match="0-1")
    assert not local_storage.exists("models/champion.json")


def test_rapid_same_size_conditional_writes_never_reuse_an_etag(local_storage):
    # Same size, within one mtime tick: an etag seen before must never come back (ABA),
    # or a stale if_match would win.
    seen = [local_storage.write_bytes("models/champion.json", b"v0")]
    for i in range(1, 6):
        seen.append(
            local_storage.write_bytes("models/champion.json", f"v{i}".encode(), if_match=seen[-1])
        )
    assert len(set(seen)) == len(seen)
    with pytest.raises(PreconditionFailed):
        local_storage.write_bytes("models/champion.json", b"v9", if_match=seen[0])


def test_rapid_same_size_unconditional_rewrite_changes_etag(local_storage):
    # Readers compare etags (sync, champion readers): a rewrite must look like a change.
    etags = [local_storage.write_bytes("index/latest.json", f"{i}".encode()) for i in range(5)]
    assert len(set(etags)) == len(etags)


def test_url_and_uri(local_storage):
    assert local_storage.uri == local_storage.root.as_uri()
    assert local_storage.url("a/b.txt") == local_storage.root.as_uri() + "/a/b.txt"
    assert local_storage.local_path("a/b.txt") == local_storage.root / "a" / "b.txt"


def test_download_copies(local_storage, tmp_path):
    local_storage.write_bytes("models/w.bin", b"weights")
    dest = tmp_path / "out" / "w.bin"
    local_storage.download("models/w.bin", dest)
    assert dest.read_bytes() == b"weights"


# ---- open_storage ---------------------------------------------------------------------------


def test_open_storage_file_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = open_storage("file://./rel/bucket")
    assert isinstance(s, LocalStorage)
    assert s.root == (tmp_path / "rel" / "bucket").resolve()


def test_open_storage_file_absolute(tmp_path):
    s = open_storage(f"file://{tmp_path}/abs")
    assert isinstance(s, LocalStorage)
    assert s.root == (tmp_path / "abs").resolve()
    assert open_storage(s.uri).root == s.root  # its own uri opens the same root


def test_open_storage_plain_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert open_storage(str(tmp_path / "p")).root == (tmp_path / "p").resolve()
    assert open_storage("rel/dir").root == (tmp_path / "rel" / "dir").resolve()


def test_open_storage_default_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_STORAGE", f"file://{tmp_path}/envroot")
    assert open_storage().root == (tmp_path / "envroot").resolve()


def _fake_aws(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def test_open_storage_s3_with_prefix(monkeypatch):
    _fake_aws(monkeypatch)
    s = open_storage("s3://my-bucket/some/prefix/")
    assert isinstance(s, S3Storage)
    assert s.bucket == "my-bucket"
    assert s.prefix == "some/prefix"
    assert s.uri == "s3://my-bucket/some/prefix"
    assert s._key("labeled/a.png") == "some/prefix/labeled/a.png"
    assert s._rel("some/prefix/labeled/a.png") == "labeled/a.png"
    assert s.url("x.json") == "s3://my-bucket/some/prefix/x.json"
    assert s.client.meta.endpoint_url == "http://127.0.0.1:1"
    with pytest.raises(UnsafeKeyError):
        s._key("../x")


def test_open_storage_s3_bucket_only(monkeypatch):
    _fake_aws(monkeypatch)
    s = open_storage("s3://bucket")
    assert (s.bucket, s.prefix, s.uri) == ("bucket", "", "s3://bucket")
    assert s._key("a/b") == "a/b"


def test_s3_refuses_source_writes_before_network(monkeypatch):
    _fake_aws(monkeypatch)
    s = open_storage("s3://bucket/p")
    with pytest.raises(PermissionError):
        s.write_bytes("labeled/a/1.png", b"x")


@pytest.mark.parametrize("uri", ["ftp://x", "s3://ab", "s3://", "http://host/path"])
def test_open_storage_rejects(uri, monkeypatch):
    _fake_aws(monkeypatch)
    with pytest.raises(StorageError):
        open_storage(uri)


def test_write_then_os_level_view_is_complete(local_storage):
    data = os.urandom(256 * 1024)
    local_storage.write_bytes("models/v/model.safetensors", data)
    assert (local_storage.root / "models" / "v" / "model.safetensors").read_bytes() == data


@pytest.fixture
def coarse_clock(monkeypatch):
    """Simulates a filesystem whose mtime ticks slower than darkroom writes (coarse kernel
    timestamps, 1 s on some network filesystems): every write lands on the same mtime."""
    real = st.atomic_write_file
    tick = 1_700_000_000 * 10**9

    def write_on_one_tick(dest, data):
        real(dest, data)
        os.utime(dest, ns=(tick, tick))

    monkeypatch.setattr(st, "atomic_write_file", write_on_one_tick)


def test_coarse_clock_conditional_writes_never_reuse_an_etag(local_storage, coarse_clock):
    seen = [local_storage.write_bytes("models/champion.json", b"v0")]
    for i in range(1, 4):
        seen.append(
            local_storage.write_bytes("models/champion.json", f"v{i}".encode(), if_match=seen[-1])
        )
    assert len(set(seen)) == len(seen)
    with pytest.raises(PreconditionFailed):  # a stale reader must lose
        local_storage.write_bytes("models/champion.json", b"v9", if_match=seen[0])
    assert local_storage.read_bytes("models/champion.json") == b"v3"


def test_coarse_clock_unconditional_rewrite_changes_etag(local_storage, coarse_clock):
    etags = [local_storage.write_bytes("index/latest.json", f"{i}".encode()) for i in range(3)]
    assert len(set(etags)) == len(etags)
    assert local_storage.etag("index/latest.json") == etags[-1]


def test_published_files_follow_the_umask_not_mkstemp_0600(local_storage):
    old = os.umask(0o022)
    os.umask(old)
    local_storage.write_text("models/champion.json", "{}")
    mode = (local_storage.root / "models" / "champion.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~old
