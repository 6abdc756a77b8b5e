"""Which incoming images are new: the watcher's state, kept in storage.

An image is new when its (key, etag) pair is under ``incoming/``, no model (the champion or an
earlier one) has scored it, and no earlier tick announced it. The announced pairs live in ``reports/watch/announced.json``
(written atomically, pruned to what is still under ``incoming/``), so repeated ticks announce
each arrival once, and a replaced image (new etag) counts as a new arrival.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from darkroom import layout, registry
from darkroom.config import StorageConfig
from darkroom.scoring import scored_pairs
from darkroom.storage import Storage
from darkroom.sync import is_image_key

ARRIVED = "darkroom.images.arrived"


class WatchConfig(StorageConfig):
    """Parameters of the ``watch_incoming`` flow (how often it runs is its schedule)."""


def resource_id(storage: Storage) -> str:
    """The Prefect event resource that names a storage root (DESIGN: darkroom.storage.<root>)."""
    return f"darkroom.storage.{storage.uri}"


def read_announced(storage: Storage) -> set[tuple[str, str]]:
    state = storage.read_json(layout.WATCH_STATE, missing_ok=True) or {}
    return {(k, e) for k, e in state.get("pairs", [])}


def new_arrivals(storage: Storage) -> tuple[list[tuple[str, str]], dict]:
    """New (key, etag) pairs under ``incoming/`` and the counts behind the decision."""
    listed = sorted((o.key, o.etag) for o in storage.list(layout.INCOMING) if is_image_key(o.key))
    champion, _ = registry.read_champion(storage)
    # What a plain score run would skip: pairs any model version already scored.
    scored = scored_pairs(storage, None)
    announced = read_announced(storage)
    new = [p for p in listed if p not in scored and p not in announced]
    return new, {
        "incoming": len(listed),
        "scored": len(scored & set(listed)),
        "announced": len(announced & set(listed)),
        "new": len(new),
        "champion": champion["version"] if champion else None,
    }


def mark_announced(storage: Storage, pairs: list[tuple[str, str]]) -> None:
    """Adds ``pairs`` to the state, keeping only pairs still under ``incoming/``."""
    present = {(o.key, o.etag) for o in storage.list(layout.INCOMING)}
    keep = sorted((read_announced(storage) | set(pairs)) & present)
    state = {"updated_at": datetime.now(UTC).isoformat(), "pairs": [list(p) for p in keep]}
    storage.write_json(layout.WATCH_STATE, state)


def check_incoming(storage: Storage, emit: Callable[..., object]) -> dict:
    """One watcher tick: announces new images with a single ``darkroom.images.arrived`` event
    (``emit(event=, resource=, payload=)``), or does nothing when there are none or when
    there is no champion to score them with yet (they stay new until there is one).

    The state is written after the event, so a failed emit is retried on the next tick; a
    failed state write only means the same images are announced twice (scoring is idempotent).
    """
    new, counts = new_arrivals(storage)
    if not new or counts["champion"] is None:  # nothing to score with yet: wait, keep them new
        return {**counts, "emitted": False}
    emit(
        event=ARRIVED,
        resource={"prefect.resource.id": resource_id(storage)},
        payload={"count": len(new), "storage": storage.uri, "keys": [k for k, _ in new[:20]]},
    )
    mark_announced(storage, new)
    return {**counts, "emitted": True}
