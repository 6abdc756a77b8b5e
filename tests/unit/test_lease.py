"""One retrain (and one scoring run) per storage root: the lease in storage."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from darkroom.storage import lease
from darkroom.storage.lease import LeaseHeld
from tests.unit.test_cli import darkroom, one_line_error


def _plant(storage, name: str, host: str, pid: int, seconds: float) -> None:
    """A lease as another run would have left it."""
    now = datetime.now(UTC)
    storage.write_json(
        f"leases/{name}.json",
        {
            "name": name,
            "holder": {"host": host, "pid": pid},
            "acquired_at": now.isoformat(),
            "expires_at": (now + timedelta(seconds=seconds)).isoformat(),
        },
    )


def test_a_second_run_is_refused_with_the_holder_named(local_storage):
    first = lease.acquire(local_storage, "retrain", ttl=60)
    with pytest.raises(LeaseHeld, match=rf"{socket.gethostname()} pid \d+"):
        lease.acquire(local_storage, "retrain", ttl=60)
    lease.acquire(local_storage, "score", ttl=60)  # another lease, another name
    first.release()
    lease.acquire(local_storage, "retrain", ttl=60)  # free again


def test_a_lease_left_by_a_killed_run_here_is_taken_over_at_once(local_storage):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(local_storage, "retrain", socket.gethostname(), dead.pid, seconds=3600)
    taken = lease.acquire(local_storage, "retrain", ttl=60)
    assert (
        local_storage.read_json("leases/retrain.json")["holder"]["pid"]
        == taken.record["holder"]["pid"]
    )


def test_another_machines_lease_counts_until_it_expires(local_storage):
    _plant(local_storage, "score", "other-host", 1, seconds=3600)
    with pytest.raises(LeaseHeld, match="other-host pid 1"):
        lease.acquire(local_storage, "score", ttl=60)
    _plant(local_storage, "score", "other-host", 1, seconds=-1)  # expired
    lease.acquire(local_storage, "score", ttl=60)


def test_the_holder_renews_and_releases(local_storage):
    with lease.held(local_storage, "retrain", ttl=0.6):
        first = local_storage.read_json("leases/retrain.json")["expires_at"]
        time.sleep(0.5)
        renewed = local_storage.read_json("leases/retrain.json")["expires_at"]
        assert renewed > first
    assert not local_storage.exists("leases/retrain.json")


def test_the_cli_stops_with_the_holder_named(local_storage):
    from tests.conftest import write_digits

    write_digits(local_storage, per_class=5)
    _plant(local_storage, "retrain", "nightly-box", 4242, seconds=3600)
    run = darkroom("retrain", "--storage", local_storage.uri, "--no-pretrained")
    one_line_error(run, "another retrain run holds", "nightly-box pid 4242")
    _plant(local_storage, "score", "scorer", 7, seconds=3600)
    one_line_error(darkroom("score", "--storage", local_storage.uri), "scorer pid 7")
    assert json.loads((local_storage.root / "leases" / "retrain.json").read_text())
