"""The watcher's task: one look at incoming/, announcing new images with one event."""

from __future__ import annotations

from prefect.events import emit_event

from darkroom.scoring import watch
from darkroom.storage import open_storage
from tasks.retry import io_task


@io_task(name="check-incoming")
def check_incoming(config: watch.WatchConfig) -> watch.Tick:
    """One tick (``darkroom.scoring.watch.check_incoming``). A retry after the event went out
    may announce the same images again: scoring them is idempotent."""
    return watch.check_incoming(open_storage(config.storage), emit_event)
