"""The labeling queue and import-labels on an S3 root (moto's HTTP server): presigned links that
open the image, answers found back by their link when the export lost the key, the fixtures'
s3:// pictures, and labeled incoming images downloaded into the index."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import pandas as pd
import pytest

from darkroom.config import LabelQueueConfig, RetrainConfig
from darkroom.data.index import read_index, rebuild_index
from darkroom.data.labels import read_labels
from darkroom.data.sync import sync_labeled
from darkroom.monitoring.answers import import_labels
from darkroom.monitoring.labeling import build_queue
from darkroom.storage import open_storage
from tests.conftest import TINY, write_digits
from tests.labeling_helpers import fixture, make_champion, put_images, write_predictions

pytestmark = pytest.mark.s3
KEYS = [f"incoming/2026/{n}.jpg" for n in "abcd"]


def _lifetime(url: str) -> float:
    """Seconds the presigned link is valid for (SigV4: X-Amz-Expires; SigV2: Expires, a time)."""
    query = parse_qs(urlsplit(url).query)
    if "X-Amz-Expires" in query:
        return float(query["X-Amz-Expires"][0])
    return float(query["Expires"][0]) - time.time()


@pytest.fixture
def root(s3_env):
    storage = open_storage(s3_env["uri"])
    make_champion(storage)
    put_images(storage, KEYS)
    return storage


def test_presigned_links_open_the_image_and_lead_back_to_its_key(root):
    write_predictions(root, "v1", {k: [0.5, 0.4, 0.1] for k in KEYS})
    r = build_queue(root, LabelQueueConfig(storage=root.uri, n=4, url_expiry_seconds=3600))
    assert r.links == "presigned" and r.expires_at
    tasks = root.read_json(r.files["json"])
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith("http") and _lifetime(url) == pytest.approx(3600, abs=120)
        reply = httpx.get(url, timeout=30)  # what Label Studio's browser does
        assert reply.status_code == 200 and reply.content == root.read_bytes(task["data"]["key"])
    # An export whose tasks lost their key (JSON_MIN of edited tasks): found by the link.
    rows = [{"image": t["data"]["image"], "label": "fox"} for t in tasks[:2]]
    report = import_labels(root, json.dumps(rows).encode(), "min.json")
    assert report.added == {t["data"]["key"]: "fox" for t in tasks[:2]}
    assert report.unknown == {}


def test_the_fixture_export_of_an_s3_root(root):
    r = import_labels(root, fixture("export.json", root.uri), "export.json")
    assert r.added == {"incoming/2026/a.jpg": "dog"} and r.skipped == ["incoming/2026/b.jpg"]
    assert r.disagreements == {"incoming/2026/c.jpg": ["cat", "fox"]}
    assert read_labels(root).labels == {"incoming/2026/a.jpg": "dog"}


def test_labeled_incoming_images_are_downloaded_into_the_index(s3_env, tmp_path):
    storage = open_storage(s3_env["uri"])
    written = write_digits(storage, per_class=4, incoming=20)
    answered = sorted(k for k, v in written.items() if k.startswith("incoming/") and v in "012")[:2]
    storage.write_parquet(
        "labels.parquet", pd.DataFrame({"key": answered, "label": [written[k] for k in answered]})
    )
    config = RetrainConfig(
        storage=storage.uri, cache_dir=str(tmp_path / "cache"), device="cpu", train=TINY
    )
    sync_labeled(storage, config)
    snapshot = rebuild_index(storage, config, "run").snapshot
    rows = read_index(storage, snapshot).rows.set_index("key")
    assert set(answered) <= set(rows.index)
    assert (rows.loc[answered, "status"] == "ok").all()
    assert rows.loc[answered, "label"].tolist() == [written[k] for k in answered]
    assert all((tmp_path / "cache" / "objects" / k).exists() for k in answered)
