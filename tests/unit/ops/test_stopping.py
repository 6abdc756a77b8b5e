"""darkroom.ops.stopping: the stop event reaches the worker threads a task runner starts (they run
in a copy of the submitting context) and is set only when the block fails."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from darkroom.ops import stopping


def _in_worker(pool: ThreadPoolExecutor, fn):
    """``fn`` on a pool thread, in a copy of this context: how Prefect's thread pool runs a
    task."""
    return pool.submit(contextvars.copy_context().run, fn)


def test_outside_a_scope_nothing_ever_stops():
    assert not stopping.requested()
    stopping.check()


def test_a_failing_block_stops_the_work_it_submitted():
    started, go_on = threading.Event(), threading.Event()

    def fold():
        started.set()
        go_on.wait(10)
        for _ in range(1000):  # batches
            stopping.check()
        return "finished"

    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(KeyboardInterrupt), stopping.scope() as event:
            future = _in_worker(pool, fold)
            started.wait(10)
            raise KeyboardInterrupt  # SIGTERM, as Prefect raises it in the flow's thread
        assert event.is_set()
        go_on.set()
        with pytest.raises(stopping.Stopped, match="the run is stopping"):
            future.result(10)
    assert not stopping.requested()  # the scope is gone with its block


def test_a_block_that_ends_well_stops_nothing():
    with ThreadPoolExecutor(1) as pool, stopping.scope() as event:
        assert _in_worker(pool, lambda: stopping.check() or "done").result(10) == "done"
    assert not event.is_set()
