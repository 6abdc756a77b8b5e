"""A lease in storage: at most one retrain (or one scoring run) per storage root, whether it was
started by a deployment, from the CLI, or both at once.

The lease is one small JSON object (``leases/<name>.json``) created with a conditional write,
renewed by its holder while it runs and deleted at the end. A second run finds it and stops
with a message naming the holder. A lease left by a killed run stops counting when it expires,
or at once when its holder was a process on this machine that no longer exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from darkroom import layout
from darkroom.storage import PreconditionFailed, Storage, StorageError

log = logging.getLogger(__name__)


class LeaseHeld(StorageError):
    """Another run holds the lease; the message names it."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _dead_here(record: dict) -> bool:
    """True when the holder was a process on this machine that is gone (killed, crashed)."""
    holder = record.get("holder") or {}
    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


@dataclass
class Lease:
    """A held lease. ``version``: the model version the run works with (a retrain's candidate,
    a scoring run's champion), recorded so that ``darkroom cleanup`` keeps it."""

    storage: Storage
    name: str
    ttl: float
    etag: str = ""
    record: dict = field(default_factory=dict)
    version: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def key(self) -> str:
        return layout.lease(self.name)

    def _fresh(self) -> dict:
        now = datetime.now(UTC)
        acquired = self.record.get("acquired_at", now.isoformat())
        expires = (now + timedelta(seconds=self.ttl)).isoformat()
        record = {"name": self.name, "holder": _holder(), "acquired_at": acquired}
        return {**record, "expires_at": expires, "version": self.version}

    def renew(self) -> None:
        """Pushes the expiry forward (only if the lease is still this one)."""
        with self._lock:  # the renewing thread and ``hold`` write one after the other
            record = self._fresh()
            self.etag = self.storage.write_json(self.key, record, if_match=self.etag)
            self.record = record

    def hold(self, version: str) -> None:
        """Records that the run works with ``version`` (written at once)."""
        self.version = version
        self.renew()

    def release(self) -> None:
        if self.storage.etag(self.key) == self.etag:
            self.storage.delete(self.key)


def _live(record: dict) -> bool:
    expires = datetime.fromisoformat(record.get("expires_at", "1970-01-01T00:00:00+00:00"))
    return expires > datetime.now(UTC) and not _dead_here(record)


def _refuse_if_live(storage: Storage, name: str, record: dict) -> None:
    if record and _live(record):
        holder = record.get("holder", {})
        raise LeaseHeld(
            f"another {name} run holds {storage.url(layout.lease(name))}: {holder.get('host')} "
            f"pid {holder.get('pid')} since {record.get('acquired_at')} (lease until "
            f"{record.get('expires_at')}); wait for it to finish"
        )


@dataclass(frozen=True)
class Holding:
    """A live run's lease: the run (``name``: retrain, score) and the version it works with
    (None until it names one)."""

    name: str
    version: str | None = None


def live(storage: Storage) -> list[Holding]:
    """The leases that live runs hold on ``storage`` now (any name)."""
    records = (storage.read_json(o.key, missing_ok=True) for o in storage.list(layout.LEASES))
    held = [r for r in records if isinstance(r, dict) and _live(r)]
    return [Holding(r.get("name", "?"), r.get("version")) for r in held]


def check_free(storage: Storage, name: str) -> None:
    """Raises LeaseHeld when a live run holds ``name`` (a look before starting; ``acquire``
    is what guarantees one run at a time)."""
    _refuse_if_live(storage, name, storage.read_json(layout.lease(name), missing_ok=True) or {})


def acquire(storage: Storage, name: str, ttl: float) -> Lease:
    """Takes the lease ``name`` on ``storage`` for ``ttl`` seconds (renew to keep it).

    Raises:
        LeaseHeld: a live run holds it.
    """
    lease = Lease(storage, name, ttl)
    lease.record = lease._fresh()
    try:
        lease.etag = storage.write_json(lease.key, lease.record, if_none_match=True)
        return lease
    except PreconditionFailed:
        pass
    etag, current = storage.etag(lease.key), storage.read_json(lease.key, missing_ok=True) or {}
    _refuse_if_live(storage, name, current)
    try:  # a dead holder's lease: take it over, unless another run just did
        lease.etag = storage.write_json(lease.key, lease.record, if_match=etag)
    except PreconditionFailed as e:
        raise LeaseHeld(f"another {name} run took {storage.url(lease.key)} just now") from e
    log.info("took over the %s lease of a run that is gone: %s", name, current.get("holder"))
    return lease


@contextlib.contextmanager
def held(storage: Storage, name: str, ttl: float) -> Iterator[Lease]:
    """The lease ``name`` for the duration of the block, renewed every ttl/3 seconds."""
    lease = acquire(storage, name, ttl)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                lease.renew()
            except Exception as e:  # the run goes on; the next renewal tries again
                log.warning("could not renew the %s lease: %s", name, e)

    thread = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=10)
        with contextlib.suppress(Exception):  # an unreleased lease expires by itself
            lease.release()
