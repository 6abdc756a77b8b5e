"""Keys with Unicode, spaces and ``+`` round-trip through a real S3 endpoint (moto's server):
listed, synced, indexed, planned and read back under exactly the key they were written as."""

from __future__ import annotations

import pytest

from darkroom.config import RetrainConfig
from darkroom.data.index import read_index, rebuild_index
from darkroom.data.sync import sync_labeled
from darkroom.scoring import plan as planning
from darkroom.storage import open_storage
from tests.conftest import TINY, png_bytes

pytestmark = pytest.mark.s3

# Spaces and "+" are where form-encoding slips ("+" read back as a space), non-ASCII is
# where a listing's URL-encoding slips: each class name and file name has some.
CLASSES = ("é", "日本 語", "a+b")
NAMES = ("photo 1+1.png", "写真 é.png", "x%20y+.png")


def _put(s3_env, key: str, body: bytes) -> None:
    full = f"{s3_env['prefix']}/{key}"
    s3_env["client"].put_object(Bucket=s3_env["bucket"], Key=full, Body=body)


@pytest.fixture
def hostile_keys(s3_env) -> dict[str, bytes]:
    """Three classes of six images each under hostile keys, put with plain boto3."""
    written = {}
    for c, cls in enumerate(CLASSES):
        for i in range(6):
            key = f"labeled/{cls}/{i} {NAMES[i % len(NAMES)]}"
            written[key] = png_bytes(10 + 40 * c + 5 * i, 32)
            _put(s3_env, key, written[key])
    for i, name in enumerate(NAMES):
        written[f"incoming/{name}"] = png_bytes(200 + i, 32)
        _put(s3_env, f"incoming/{name}", written[f"incoming/{name}"])
    return written


def test_hostile_keys_sync_index_and_read_back(s3_env, hostile_keys, tmp_path):
    storage = open_storage(s3_env["uri"])
    labeled = sorted(k for k in hostile_keys if k.startswith("labeled/"))
    config = RetrainConfig(storage=s3_env["uri"], cache_dir=str(tmp_path / "cache"), train=TINY)

    report = sync_labeled(storage, config)
    assert (report.listed, report.new, report.refused, report.failed) == (18, 18, 0, 0)
    result = rebuild_index(storage, config, "keys")
    assert result.quarantine is None
    rows = read_index(storage, result.snapshot).rows.set_index("key")
    assert sorted(rows.index) == labeled  # the exact keys, byte for byte
    assert result.classes == sorted(CLASSES)
    assert rows.loc[labeled, "label"].tolist() == [k.split("/")[1] for k in labeled]
    assert (rows["status"] == "ok").all()

    for key in (labeled[0], "incoming/x%20y+.png", "incoming/写真 é.png"):
        assert storage.read_bytes(key) == hostile_keys[key]
        assert storage.etag(key) is not None


def test_hostile_keys_in_a_labels_file_and_in_planning(s3_env, hostile_keys, tmp_path):
    storage = open_storage(s3_env["uri"])
    moved = "labeled/é/0 photo 1+1.png"
    storage.write_text("labels.csv", f"key,label\né/0 photo 1+1.png,a+b\n{moved}x,é\n")
    config = RetrainConfig(storage=s3_env["uri"], cache_dir=str(tmp_path / "cache"), train=TINY)
    sync_labeled(storage, config)
    result = rebuild_index(storage, config, "keys")
    rows = read_index(storage, result.snapshot).rows.set_index("key")
    assert rows.loc[moved, "label"] == "a+b"
    report = storage.read_parquet(result.quarantine)
    assert report[["key", "label", "status"]].values.tolist() == [
        [moved + "x", "é", "missing_object"]
    ]

    plan = planning.pending_chunks(storage, "v1", chunk_size=2)
    planned = sorted(k for chunk in plan.chunks for k, _ in chunk)
    assert planned == sorted(f"incoming/{n}" for n in NAMES)
    assert len({planning.chunk_id(c) for c in plan.chunks}) == len(plan.chunks)
