"""Conditional writes whose reply is lost on the way back (moto behind the fault proxy).

The PUT lands, the connection is reset before its answer, boto sends the PUT again and S3
refuses it (412: the object has changed, by that very first try). darkroom must see its own
write there, not a rival's: the promotion goes through with its history record, the lease is
taken and can be renewed. A real rival's write is still refused.
"""

from __future__ import annotations

import pytest

from darkroom import layout
from darkroom.registry import pointer
from darkroom.storage import PreconditionFailed, lease, open_storage

pytestmark = pytest.mark.s3


def _version(storage, version: str) -> None:
    """The files ``pointer.verify`` wants before a version can become the champion."""
    storage.write_json(layout.version(version, "metrics.json"), {"holdout": {"accuracy": 0.9}})
    storage.write_bytes(layout.version(version, "model.safetensors"), b"weights")


def _puts(proxy) -> int:
    return proxy.calls().get("PUT", 0)


def test_a_promotion_whose_reply_is_lost_still_promotes_and_records(s3_faulty):
    storage, proxy = open_storage(s3_faulty["uri"]), s3_faulty["proxy"]
    for v in ("v1", "v2"):
        _version(storage, v)
    proxy.lose_writes = {layout.CHAMPION: 1}
    before = _puts(proxy)
    pointer.promote(storage, "v1", expected_etag=None, action="promote", reason="first")
    assert proxy.faults() == {"lost": 1}
    assert _puts(proxy) - before >= 3  # the lost PUT, boto's retry of it, the history record

    champion, etag = pointer.read_champion(storage)
    assert champion.version == "v1"
    assert [r.version for r in pointer.history(storage)] == ["v1"]

    # The same with If-Match: replacing a champion.
    proxy.lose_writes = {layout.CHAMPION: 1}
    pointer.promote(storage, "v2", expected_etag=etag, action="promote", reason="better")
    assert proxy.faults() == {"lost": 2}
    assert pointer.read_champion(storage)[0].version == "v2"
    assert pointer.lineage(pointer.history(storage)) == ["v1", "v2"]
    assert pointer.rollback(storage).version == "v1"  # the chain is whole


def test_a_rival_write_is_still_refused(s3_faulty):
    storage = open_storage(s3_faulty["uri"])
    for v in ("v1", "v2", "v3"):
        _version(storage, v)
    pointer.promote(storage, "v1", expected_etag=None, action="promote", reason="first")
    _, etag = pointer.read_champion(storage)
    pointer.promote(storage, "v2", expected_etag=etag, action="promote", reason="rival")
    with pytest.raises(pointer.PromotionLost):
        pointer.promote(storage, "v3", expected_etag=etag, action="promote", reason="stale")
    with pytest.raises(PreconditionFailed):  # If-None-Match on an object that exists
        storage.write_json(layout.CHAMPION, {"version": "v3"}, if_none_match=True)
    assert pointer.read_champion(storage)[0].version == "v2"


def test_a_lease_whose_reply_is_lost_is_taken_and_renewed(s3_faulty):
    storage, proxy = open_storage(s3_faulty["uri"]), s3_faulty["proxy"]
    key = layout.lease("retrain")
    proxy.lose_writes = {key: 1}
    held = lease.acquire(storage, "retrain", ttl=600)  # before: LeaseHeld naming this process
    assert proxy.faults() == {"lost": 1}
    assert held.etag == storage.etag(key)

    proxy.lose_writes = {key: 1}
    held.renew()  # before: the etag kept was stale, and every later renewal failed
    assert proxy.faults() == {"lost": 2}
    assert held.etag == storage.etag(key)
    held.renew()
    assert held.etag == storage.etag(key)
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(storage, "retrain", ttl=600)
    held.release()
    assert storage.etag(key) is None
