"""Retention on S3: `darkroom cleanup --apply` deletes in DeleteObjects batches of at most 1,000
keys (counted at the server's door, tests/s3/fault_proxy.py), never one DELETE per key, and
leaves the user's images and the predictions alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from darkroom import layout
from darkroom.cli.main import main
from darkroom.registry import pointer
from darkroom.registry.retention import size_text
from darkroom.storage.s3 import S3Storage
from tests.s3.conftest import list_keys

pytestmark = pytest.mark.s3
OLD, NEW = "0000aaaa-00000001", "1111bbbb-00000002"
FILES = 1_100  # beyond one DeleteObjects request


@pytest.fixture
def root(s3_faulty) -> S3Storage:
    """Two versions written past the proxy: OLD with 1,100 small fold files (plus its
    model.json), NEW the champion; an image under labeled/ and incoming/, a predictions file."""
    direct = S3Storage(s3_faulty["bucket"], s3_faulty["prefix"], client=s3_faulty["client"])
    now = datetime.now(UTC)
    for version, days in ((OLD, 30), (NEW, 1)):
        created = (now - timedelta(days=days)).isoformat()
        direct.write_json(layout.version(version, "model.json"), {"created_at": created})
        direct.write_bytes(layout.version(version, "model.safetensors"), b"w" * 100)
    keys = [layout.fold(OLD, k % 5, f"part-{k:04d}.bin") for k in range(FILES)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: direct.write_bytes(k, b"x" * 10), keys))
    pointer.promote(direct, NEW, expected_etag=None, action="promote", reason="test")
    for key in ("labeled/0/a.png", "incoming/b.png"):
        direct.put_source_object(key, b"image")
    direct.write_bytes(layout.predictions(OLD, "c"), b"rows")
    assert s3_faulty["proxy"].calls() == {}
    return direct


def test_cleanup_deletes_in_batches_of_at_most_1000_keys(s3_faulty, root, capsys):
    proxy, client, bucket = s3_faulty["proxy"], s3_faulty["client"], s3_faulty["bucket"]
    prefix = s3_faulty["prefix"] + "/"

    def sizes() -> dict[str, int]:
        return {k.removeprefix(prefix): o["Size"] for k, o in list_keys(client, bucket).items()}

    before = sizes()
    args = ["cleanup", "--storage", s3_faulty["uri"], "--keep-versions", "1", "--apply"]
    assert main(args) == 0
    out = capsys.readouterr().out
    calls = proxy.calls()
    assert calls.get("POST") == 2 and "DELETE" not in calls  # 1,000 + 102 keys
    after = sizes()
    assert set(before) - set(after) == {k for k in before if k.startswith(layout.version(OLD))}
    assert len(before) - len(after) == FILES + 2
    freed = sum(before.values()) - sum(after.values())
    assert f"freed {size_text(freed)} ({freed} bytes)" in out
    assert {"labeled/0/a.png", "incoming/b.png", layout.predictions(OLD, "c")} <= set(after)
    assert layout.version(NEW, "model.json") in after
