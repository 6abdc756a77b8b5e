"""One retrain (and one scoring run) per storage root: the lease in storage."""

from __future__ import annotations

import socket
import time

import pytest

from darkroom.storage import lease
from darkroom.storage.lease import LeaseHeld
from tests.conftest import plant_lease


def test_a_second_run_is_refused_with_the_holder_named(local_storage):
    first = lease.acquire(local_storage, "retrain", ttl=60)
    with pytest.raises(LeaseHeld, match=rf"{socket.gethostname()} pid \d+"):
        lease.acquire(local_storage, "retrain", ttl=60)
    lease.acquire(local_storage, "score", ttl=60)  # another lease, another name
    first.release()
    lease.acquire(local_storage, "retrain", ttl=60)  # free again


def test_another_machines_lease_counts_until_it_expires(local_storage):
    plant_lease(local_storage, "score", "other-host", 1, seconds=3600)
    with pytest.raises(LeaseHeld, match="other-host pid 1"):
        lease.acquire(local_storage, "score", ttl=60)
    plant_lease(local_storage, "score", "other-host", 1, seconds=-1)  # expired
    lease.acquire(local_storage, "score", ttl=60)


def test_the_holder_renews_and_releases(local_storage):
    with lease.held(local_storage, "retrain", ttl=0.6):
        first = local_storage.read_json("leases/retrain.json")["expires_at"]
        time.sleep(0.5)
        renewed = local_storage.read_json("leases/retrain.json")["expires_at"]
        assert renewed > first
    assert not local_storage.exists("leases/retrain.json")
