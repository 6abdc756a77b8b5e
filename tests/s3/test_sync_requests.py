"""What a sync asks of S3, counted at the server's door (tests/s3/fault_proxy.py): one GET per
new or changed object and no HEAD; nothing but listings when nothing changed. Bodies cut
short or spoilt on the wire never leave a partial or wrong file in the cache."""

from __future__ import annotations

import pytest

from darkroom.config import RetrainConfig
from darkroom.data.fetch import fetch_objects, load_manifest
from darkroom.data.sync import SyncIncomplete, sync_labeled, sync_prefix
from darkroom.storage import open_storage
from darkroom.storage.s3 import S3Storage
from tests.conftest import TINY, png_bytes, write_digits

pytestmark = pytest.mark.s3


@pytest.fixture
def labeled(s3_faulty) -> dict[str, bytes]:
    """15 digits under labeled/, written past the proxy: key -> bytes."""
    direct = S3Storage(s3_faulty["bucket"], s3_faulty["prefix"], client=s3_faulty["client"])
    keys = sorted(write_digits(direct, per_class=5))
    assert s3_faulty["proxy"].calls() == {}
    return {k: direct.read_bytes(k) for k in keys}


def _new_calls(proxy, before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in proxy.calls().items() if n != before.get(k, 0)}


def _cached_files(cache) -> dict[str, bytes]:
    root = cache / "objects"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_sync_gets_each_new_object_once_and_never_heads(s3_faulty, labeled, tmp_path):
    proxy, cache = s3_faulty["proxy"], tmp_path / "cache"
    storage = open_storage(s3_faulty["uri"])

    report, _ = sync_prefix(storage, "labeled/", cache, concurrency=4)
    first = proxy.calls()
    assert report.new == len(labeled) == 15
    assert set(first) == {"LIST", "GET"} and first["GET"] == 15
    assert _cached_files(cache) == labeled

    again, _ = sync_prefix(storage, "labeled/", cache)
    assert again.unchanged == 15
    assert set(_new_calls(proxy, first)) == {"LIST"}  # no GET, no HEAD

    changed = sorted(labeled)[3]
    s3_faulty["client"].put_object(
        Bucket=s3_faulty["bucket"], Key=f"{s3_faulty['prefix']}/{changed}", Body=png_bytes(9)
    )
    before = proxy.calls()
    report, _ = sync_prefix(storage, "labeled/", cache)
    assert (report.changed, report.unchanged) == (1, 14)
    assert set(_new_calls(proxy, before)) == {"LIST", "GET"}
    assert _new_calls(proxy, before)["GET"] == 1
    assert _cached_files(cache)[changed] == png_bytes(9)


@pytest.mark.parametrize(("fault", "why"), [("truncate", "broke off"), ("corrupt", "ETag")])
def test_spoilt_bodies_leave_no_file_and_a_retried_sync_completes(
    s3_faulty, labeled, tmp_path, fault, why
):
    proxy, cache = s3_faulty["proxy"], tmp_path / "cache"
    storage = open_storage(s3_faulty["uri"])
    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache), device="cpu", train=TINY)

    # Every GET of an object spoilt (listings spared), every retry too.
    proxy.configure(rate=1.0, seed=3, kinds=(fault,), only=("GET",))
    with pytest.raises(SyncIncomplete, match=why):
        sync_labeled(storage, config)
    assert proxy.faults()[fault] >= 15 * 2  # each object was fetched again before giving up
    assert _cached_files(cache) == {}  # no partial file, no temp file, nothing wrong
    assert load_manifest(cache, "labeled/") == {}

    proxy.configure(rate=0.5)  # half spoilt: retries within and across syncs get through
    for _ in range(4):
        try:
            report = sync_labeled(storage, config)
            break
        except SyncIncomplete:
            assert _cached_files(cache).items() <= labeled.items()  # what is there is right
    else:
        pytest.fail("4 syncs in a row left objects out at a fault rate of 0.5")
    assert proxy.faults()[fault] > 15 * 4  # more than the first phase drew
    assert (report.failed, report.new + report.unchanged) == (0, 15)
    assert _cached_files(cache) == labeled
    assert set(load_manifest(cache, "labeled/")) == set(labeled)
    assert proxy.calls().get("HEAD", 0) == 0


def test_a_sync_stopped_midway_starts_no_more_downloads(s3_faulty, tmp_path):
    """SIGTERM or a timeout lands in the thread waiting for the downloads (a KeyboardInterrupt
    from the progress callback, here): the downloads under way finish, the queued ones never
    start, and the exception goes on up."""
    direct = S3Storage(s3_faulty["bucket"], s3_faulty["prefix"], client=s3_faulty["client"])
    keys = sorted(write_digits(direct, classes=("0", "1", "2", "3"), per_class=50))
    proxy, storage = s3_faulty["proxy"], open_storage(s3_faulty["uri"])
    objects = [o for o in storage.list("labeled/") if o.key in set(keys)]
    assert len(objects) == 200

    def progress(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    before = proxy.calls().get("GET", 0)
    with pytest.raises(KeyboardInterrupt):
        fetch_objects(storage, objects, tmp_path / "cache", concurrency=4, progress=progress)
    gets = proxy.calls().get("GET", 0) - before
    assert 5 <= gets <= 5 + 4 + 4, gets  # the 5 done, at most 4 under way, and 4 more queued
