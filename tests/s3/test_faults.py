"""darkroom on a broken network: moto's S3 server behind a fault-injecting proxy
(tests/s3/fault_proxy.py), talked to over HTTP exactly as darkroom talks to S3.

Objects that cannot be downloaded stop the retrain before indexing (all or nothing, unless
the config accepts a share of losses); throttling, resets and bodies cut short on the wire
change no result: a run through them equals a run without them, bit for bit.
"""

from __future__ import annotations

import http.client
import time
from urllib.parse import urlsplit

import pytest

from darkroom import layout
from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.data.fetch import load_manifest
from darkroom.data.index import read_index, rebuild_index
from darkroom.data.sync import SyncDenied, SyncIncomplete, sync_labeled
from darkroom.registry import pointer
from darkroom.registry.promotion import judge, promote_candidate, record_candidate
from darkroom.scoring.chunks import read_predictions, score_chunk
from darkroom.scoring.plan import pending_chunks
from darkroom.storage import StorageError, open_storage
from darkroom.storage.s3 import S3Storage
from darkroom.training.fold import train_fold
from tests.conftest import TINY, train_candidate, write_digits
from tests.s3.fault_proxy import FAULTS

pytestmark = [pytest.mark.s3, pytest.mark.slow]

RATE, SEED = 0.08, 7  # 4 of every 50 requests get a fault
# Two digits the tiny model tells apart in two epochs: the first champion gets promoted.
CLASSES = ("0", "1")
TRAIN = TINY.model_copy(update={"epochs": 2, "lr": 1e-2, "batch_size": 8})


def _direct(s3: dict, bucket: str | None = None) -> S3Storage:
    """The test's root through a client that bypasses the proxy: to set up data."""
    return S3Storage(bucket or s3["bucket"], s3["prefix"], client=s3["client"])


def test_the_proxy_forwards_a_chunked_body_and_copies_the_answer(s3_faulty):
    proxy, bucket = s3_faulty["proxy"], s3_faulty["bucket"]
    conn = http.client.HTTPConnection(urlsplit(proxy.url).netloc, timeout=10)
    conn.request("PUT", f"/{bucket}/chunked.bin", body=iter([b"abc", b"", b"defg"]))
    assert conn.getresponse().read() is not None
    conn.close()
    stored = s3_faulty["client"].get_object(Bucket=bucket, Key="chunked.bin")
    assert stored["Body"].read() == b"abcdefg"
    storage = S3Storage(bucket)
    assert storage.read_bytes("chunked.bin") == b"abcdefg"
    assert storage.head("chunked.bin")["ContentLength"] == 7  # a HEAD keeps its length
    assert proxy.faults() == {} and proxy.requests == 3


def test_bodies_cut_short_are_fetched_again(s3_faulty, tmp_path):
    data = bytes(range(256)) * 40
    s3_faulty["client"].put_object(Bucket=s3_faulty["bucket"], Key="root/sub/m/x.bin", Body=data)
    storage, proxy = open_storage(s3_faulty["uri"]), s3_faulty["proxy"]
    proxy.configure(rate=0.5, seed=SEED, kinds=("truncate",))
    for i in range(8):
        assert storage.read_bytes("m/x.bin") == data
        storage.download("m/x.bin", tmp_path / f"{i}.bin")  # one GET, retried whole
        assert (tmp_path / f"{i}.bin").read_bytes() == data
    assert proxy.faults()["truncate"] >= 8

    proxy.configure(rate=1.0)  # every GET cut short: the retries give up, and say why
    with pytest.raises(StorageError, match=r"m/x.bin broke off 4 times in a row: .*IncompleteRead"):
        storage.read_bytes("m/x.bin")
    with pytest.raises(StorageError, match=r"downloading .*m/x.bin broke off every time"):
        storage.download("m/x.bin", tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()


def test_sync_is_all_or_nothing(s3_faulty, tmp_path):
    keys = sorted(write_digits(_direct(s3_faulty), per_class=10))
    broken = [keys[4], keys[21]]
    proxy = s3_faulty["proxy"]
    proxy.fail_keys = {f"{s3_faulty['prefix']}/{k}": 403 for k in broken}
    storage = open_storage(s3_faulty["uri"])
    cache = tmp_path / "cache"
    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache), device="cpu", train=TINY)

    with pytest.raises(SyncIncomplete) as e:
        sync_labeled(storage, config)
    message = str(e.value)
    print(message)
    assert message.startswith(
        f"2 of 30 objects under {storage.url('labeled/')} could not be downloaded (e.g. "
    )
    for key in broken:
        assert f"{key}: access denied (403) to {storage.uri}" in message
    assert "the retrain stops before indexing" in message and "max_failed_fraction" in message
    assert isinstance(e.value, SyncDenied)  # only refusals: a retry would get the same
    assert set(load_manifest(cache, "labeled/")) == set(keys) - set(broken)

    # Access restored: the retried sync downloads the two missing objects and nothing else.
    proxy.fail_keys = {}
    report = sync_labeled(storage, config)
    assert (report.new, report.unchanged, report.failed) == (2, 28, 0)
    assert set(load_manifest(cache, "labeled/")) == set(keys)

    # A share of losses accepted: the run goes on without them and the report says so.
    proxy.fail_keys = {f"{s3_faulty['prefix']}/{k}": 403 for k in broken}
    lenient = config.model_copy(
        update={"max_failed_fraction": 0.1, "cache_dir": str(tmp_path / "lenient")}
    )
    report = sync_labeled(storage, lenient)
    assert (report.listed, report.failed, sorted(report.failed_keys)) == (30, 2, broken)
    assert "failed 2 (left out of the manifest)" in report.summary()
    assert set(load_manifest(tmp_path / "lenient", "labeled/")) == set(keys) - set(broken)
    assert rebuild_index(storage, lenient, "test").rows == 28


def _pipeline(storage, cache_dir) -> dict:
    """Sync, index, train (checkpoints in storage), judge and promote, score every chunk:
    the core stages of both flows. Returns what a run decides."""
    version = train_candidate(storage, cache_dir, TRAIN)
    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache_dir), device="cpu", train=TRAIN)
    snapshot = read_index(storage).snapshot
    # The folds are done: these read their summaries back from storage.
    folds = [train_fold(storage, config, snapshot, version, k) for k in range(TRAIN.folds)]
    assert all(f.reused for f in folds)
    outcome = judge(storage, config, snapshot, version)
    record_candidate(storage, outcome, [f.metrics for f in folds])
    outcome = promote_candidate(storage, outcome)
    champion, _ = pointer.read_champion(storage)
    model = champion.version if champion else version
    score = ScoreConfig(storage=storage.uri, cache_dir=str(cache_dir), device="cpu", chunk_size=4)
    plan = pending_chunks(storage, model, score.chunk_size)
    for chunk in plan.chunks:
        score_chunk(storage, score, model, chunk)
    predictions = read_predictions(storage, model)
    return {
        "snapshot": snapshot,
        "version": version,
        "fold_sha256": [f.sha256 for f in folds],
        "model_sha256": storage.read_json(layout.version(version, "model.json"))["sha256"],
        "decision": (outcome.promoted, outcome.decision.rule),
        "champion": champion and champion.version,
        "chunks": len(plan.chunks),
        "labels": dict(zip(predictions["key"], predictions["label"], strict=True)),
        "status": sorted(set(predictions["status"])),
    }


def test_faults_on_the_wire_change_no_result(s3_faulty, moto_endpoint, monkeypatch, tmp_path):
    proxy, prefix = s3_faulty["proxy"], s3_faulty["prefix"]
    clean_bucket = f"{s3_faulty['bucket']}-clean"
    s3_faulty["client"].create_bucket(Bucket=clean_bucket)
    for bucket in (s3_faulty["bucket"], clean_bucket):
        write_digits(_direct(s3_faulty, bucket), CLASSES, per_class=24, incoming=12)

    proxy.configure(rate=RATE, seed=SEED)
    start = time.monotonic()
    faulty = _pipeline(open_storage(s3_faulty["uri"]), tmp_path / "faulty")
    faulty_seconds = time.monotonic() - start
    faults, requests = proxy.faults(), proxy.requests

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # straight to moto: no proxy
    start = time.monotonic()
    clean = _pipeline(open_storage(f"s3://{clean_bucket}/{prefix}"), tmp_path / "clean")
    clean_seconds = time.monotonic() - start

    print(
        f"faults injected in {requests} requests: {faults} "
        f"({sum(faults.values()) / requests:.1%}); run with faults {faulty_seconds:.1f}s, "
        f"without {clean_seconds:.1f}s; gate: {faulty['decision'][1]}"
    )
    assert proxy.requests == requests, "the clean run went through the proxy"
    assert sum(faults.values()) >= 0.05 * requests
    assert all(faults.get(kind, 0) >= 1 for kind in FAULTS), faults
    assert faulty["status"] == ["ok"] and len(faulty["labels"]) == 12
    assert faulty == clean
