"""Which incoming images are new: the watcher's state, kept in storage.

An image is new when its (key, etag) pair is under ``incoming/``, no model (the champion or an
earlier one) has scored it (the scoring ledger says so), and no earlier tick announced it. The
state, ``reports/watch/announced.json`` (written atomically), holds only the announced pairs
that are still waiting: under ``incoming/`` and not scored yet. So repeated ticks announce each
arrival once, a replaced image (new etag) counts as a new arrival, and the state shrinks back
as soon as what it announced is scored: its size follows the backlog, not the history.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from darkroom import layout
from darkroom.config import StorageConfig
from darkroom.data.names import names_an_image
from darkroom.registry import pointer
from darkroom.scoring import ledger
from darkroom.storage import Storage

ARRIVED = "darkroom.images.arrived"
LOOKUP_BATCH = 10_000  # listed pairs looked up in the ledger at once: memory follows the backlog


class WatchConfig(StorageConfig):
    """Parameters of the ``watch_incoming`` flow (how often it runs is its schedule)."""


def resource_id(storage: Storage) -> str:
    """The Prefect event resource that names a storage root (DESIGN: darkroom.storage.<root>)."""
    return f"darkroom.storage.{storage.uri}"


def read_announced(storage: Storage) -> set[tuple[str, str]]:
    state = storage.read_json(layout.WATCH_STATE, missing_ok=True) or {}
    return {(k, e) for k, e in state.get("pairs", [])}


@dataclass(frozen=True)
class Tick:
    """What one watcher tick saw and did.

    Attributes:
        incoming: images listed under ``incoming/``.
        scored: of those, the ones some model version has scored.
        announced: waiting ones an earlier tick announced.
        new: waiting ones no tick announced yet.
        champion: the champion's version; None when there is none to score with.
        emitted: whether this tick emitted ``darkroom.images.arrived``.
    """

    incoming: int
    scored: int
    announced: int
    new: int
    champion: str | None
    emitted: bool = False


@dataclass
class Look:
    """One look at ``incoming/``: the new pairs, those waiting (listed and not scored), the
    announced pairs as stored, and the counts behind the decision."""

    new: list[tuple[str, str]]
    waiting: list[tuple[str, str]]
    announced: set[tuple[str, str]]
    counts: Tick


def look(storage: Storage) -> Look:
    champion, _ = pointer.read_champion(storage)
    # What a plain score run would skip: pairs any model version already scored.
    scored = ledger.scored(storage)
    announced = read_announced(storage)
    listed = (o for o in storage.list(layout.INCOMING) if names_an_image(o.key))
    incoming, waiting = 0, []
    while batch := [(o.key, o.etag) for o in itertools.islice(listed, LOOKUP_BATCH)]:
        incoming += len(batch)
        waiting += [p for p, done in zip(batch, scored.contains(batch), strict=True) if not done]
    new = [p for p in waiting if p not in announced]
    counts = Tick(
        incoming=incoming,
        scored=incoming - len(waiting),
        announced=len(waiting) - len(new),
        new=len(new),
        champion=champion.version if champion else None,
    )
    return Look(new, waiting, announced, counts)


def new_arrivals(storage: Storage) -> tuple[list[tuple[str, str]], Tick]:
    """New (key, etag) pairs under ``incoming/`` and the counts behind the decision."""
    seen = look(storage)
    return seen.new, seen.counts


def save_announced(storage: Storage, pairs: list[tuple[str, str]]) -> None:
    state = {"updated_at": datetime.now(UTC).isoformat(), "pairs": [list(p) for p in pairs]}
    storage.write_json(layout.WATCH_STATE, state)


def check_incoming(storage: Storage, emit: Callable[..., object]) -> Tick:
    """One watcher tick: announces new images with a single ``darkroom.images.arrived`` event
    (``emit(event=, resource=, payload=)``), or does nothing when there are none or when
    there is no champion to score them with yet (they stay new until there is one).

    The state is written after the event, so a failed emit is retried on the next tick; a
    failed state write only means the same images are announced twice (scoring is idempotent).
    It is written only when it changes: the pairs announced and still waiting.
    """
    seen = look(storage)
    emitted = bool(seen.new) and seen.counts.champion is not None
    if emitted:
        emit(
            event=ARRIVED,
            resource={"prefect.resource.id": resource_id(storage)},
            payload={
                "count": len(seen.new),
                "storage": storage.uri,
                "keys": [k for k, _ in seen.new[:20]],
            },
        )
    keep = seen.waiting if emitted else [p for p in seen.waiting if p in seen.announced]
    if set(keep) != seen.announced:
        save_announced(storage, keep)
    return replace(seen.counts, emitted=emitted)
