"""sync_prefix on a local-folder root: incremental, read in place, never touches the user's files.

The download path (an S3 root) is covered with a real moto server in tests/s3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from darkroom.data.fetch import cache_path, load_manifest
from darkroom.data.names import is_image_key
from darkroom.data.sync import load_refused, sync_prefix
from darkroom.storage import UnsafeKeyError
from tests.conftest import png_bytes, write_digits


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_first_sync_everything_new(local_storage, cache_dir):
    written = write_digits(local_storage, per_class=4)
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.listed == len(written) == 12
    assert report.new == report.listed
    assert (report.changed, report.removed, report.unchanged) == (0, 0, 0)
    assert (report.failed, report.refused) == (0, 0)
    assert set(manifest) == set(written)
    assert load_manifest(cache_dir, "labeled/") == manifest
    assert "new 12" in report.summary()
    assert report.as_dict()["new"] == 12


def test_second_sync_unchanged_and_nothing_downloaded(local_storage, cache_dir):
    write_digits(local_storage, per_class=4)
    _, first = sync_prefix(local_storage, "labeled/", cache_dir)
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.unchanged == report.listed == 12
    assert (report.new, report.changed, report.removed) == (0, 0, 0)
    assert report.downloaded_bytes == 0
    assert manifest == first


def test_local_root_is_read_in_place(local_storage, cache_dir):
    written = write_digits(local_storage, per_class=2)
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    for key, entry in manifest.items():
        assert Path(entry.path) == local_storage.root.joinpath(*key.split("/"))
        assert entry.etag == local_storage.etag(key)
        assert entry.size == len(local_storage.read_bytes(key))
    assert set(manifest) == set(written)
    assert report.downloaded_bytes == 0
    assert not (Path(cache_dir) / "objects").exists()  # nothing copied


def test_modified_file_counts_as_changed(local_storage, cache_dir):
    write_digits(local_storage, per_class=3)
    sync_prefix(local_storage, "labeled/", cache_dir)
    key = "labeled/0/d-0000.png"
    path = local_storage.root / "labeled" / "0" / "d-0000.png"
    old_etag = local_storage.etag(key)
    path.write_bytes(png_bytes(value=7, size=20))  # the user replaces their image
    _bump_mtime(path)
    assert local_storage.etag(key) != old_etag
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.changed == 1
    assert report.unchanged == report.listed - 1
    assert report.new == 0
    assert manifest[key].etag == local_storage.etag(key)
    assert manifest[key].size == path.stat().st_size


def test_removed_file_leaves_manifest_not_the_users_folder(local_storage, cache_dir):
    write_digits(local_storage, per_class=3)
    sync_prefix(local_storage, "labeled/", cache_dir)
    key = "labeled/1/d-0001.png"
    path = local_storage.root / "labeled" / "1" / "d-0001.png"
    moved = path.with_name("elsewhere.bin")  # not an image: ignored by the sync
    path.rename(moved)
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.removed == 1
    assert key not in manifest
    assert key not in load_manifest(cache_dir, "labeled/")
    assert moved.exists()  # the user's file is left alone


def test_key_leaving_a_local_root_never_deletes_the_file(local_storage, cache_dir):
    write_digits(local_storage, per_class=3)
    sync_prefix(local_storage, "labeled/", cache_dir)
    # The object leaves what is synced (here: the filter changes); the file is the user's.
    report, manifest = sync_prefix(
        local_storage, "labeled/", cache_dir, key_filter=lambda k: not k.startswith("labeled/2/")
    )
    assert report.removed == 3
    assert not any(k.startswith("labeled/2/") for k in manifest)
    assert len(list((local_storage.root / "labeled" / "2").iterdir())) == 3
    assert all(local_storage.exists(o.key) for o in local_storage.list("labeled/2/"))


def test_non_images_ignored(local_storage, cache_dir):
    write_digits(local_storage, per_class=2)
    local_storage.put_source_object("labeled/0/notes.txt", b"hello")
    local_storage.put_source_object("labeled/0/README", b"x")
    local_storage.put_source_object("labeled/0/UPPER.JPG", png_bytes())
    local_storage.put_source_object("labeled/0/photo.jpeg", png_bytes())
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.listed == 6 + 2
    assert "labeled/0/notes.txt" not in manifest
    assert "labeled/0/README" not in manifest
    assert {"labeled/0/UPPER.JPG", "labeled/0/photo.jpeg"} <= set(manifest)


def test_unsupported_image_formats_are_refused_and_reported(local_storage, cache_dir):
    # A .gif or .heic under labeled/ is a photo the user meant to train on: it must show up in
    # the quarantine report, not vanish. A notes.txt is not an image: counted as ignored.
    write_digits(local_storage, per_class=2)
    for name in ("labeled/0/anim.gif", "labeled/1/scan.TIFF", "labeled/2/phone.heic"):
        local_storage.put_source_object(name, b"GIF89a not decoded")
    local_storage.put_source_object("labeled/0/notes.txt", b"hello")
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert report.listed == 6 + 3 and report.refused == 3 and report.ignored == 1
    assert not any(k.endswith((".gif", ".TIFF", ".heic")) for k in manifest)
    refused = load_refused(cache_dir, "labeled/")
    assert set(refused) == {"labeled/0/anim.gif", "labeled/1/scan.TIFF", "labeled/2/phone.heic"}
    assert {r["status"] for r in refused.values()} == {"unsupported_format"}
    assert ".png" in refused["labeled/2/phone.heic"]["error"]
    assert "ignored 1 (not images)" in report.summary()
    assert local_storage.exists("labeled/0/anim.gif")  # the user's file is left alone


def test_prefix_limits_what_is_synced(local_storage, cache_dir):
    write_digits(local_storage, per_class=2, incoming=3)
    report, manifest = sync_prefix(local_storage, "incoming/", cache_dir)
    assert report.listed == 3
    assert all(k.startswith("incoming/") for k in manifest)
    # Manifests per prefix do not clobber each other.
    sync_prefix(local_storage, "labeled/", cache_dir)
    assert set(load_manifest(cache_dir, "incoming/")) == set(manifest)
    manifest_files = sorted(p.name for p in (Path(cache_dir) / "manifests").iterdir())
    assert manifest_files == ["incoming.json", "labeled.json"]
    rows = json.loads((Path(cache_dir) / "manifests" / "incoming.json").read_text())
    assert [r["key"] for r in rows] == sorted(manifest)


def test_progress_called_per_object(local_storage, cache_dir):
    write_digits(local_storage, per_class=2)
    calls = []
    sync_prefix(local_storage, "labeled/", cache_dir, progress=lambda d, t: calls.append((d, t)))
    assert sorted(calls) == [(i, 6) for i in range(1, 7)]


def test_empty_prefix_syncs_nothing(local_storage, cache_dir):
    report, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    assert manifest == {}
    assert report.listed == 0


def test_is_image_key():
    assert is_image_key("a/b.PNG") and is_image_key("x.webp") and is_image_key("y.bmp")
    assert not is_image_key("a/b.png.txt") and not is_image_key("a/png")


@pytest.mark.parametrize(
    "key", ["../x.png", "/etc/passwd", "a\\..\\b.png", "a/../../x.png", "a//b.png", ""]
)
def test_cache_path_refuses_escaping_keys(cache_dir, key):
    with pytest.raises(UnsafeKeyError):
        cache_path(cache_dir, key)


def test_cache_path_stays_under_cache(cache_dir):
    p = cache_path(cache_dir, "incoming/sub/a.png")
    root = (Path(cache_dir) / "objects").resolve()
    assert p == root / "incoming" / "sub" / "a.png"


def test_cache_path_refuses_symlink_escape(tmp_path, cache_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (Path(cache_dir) / "objects").mkdir(parents=True)
    (Path(cache_dir) / "objects" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeKeyError):
        cache_path(cache_dir, "link/x.png")
