"""Stopping a run between steps.

A flow that fans out folds or scoring chunks opens a ``scope()`` inside its task runner: one
``threading.Event`` that the runner's worker threads see (each task runs in a copy of the
context it was submitted from), set as soon as the flow leaves the block with an error
(SIGTERM, a cancelled or crashed run, a fold that failed for good). The core's long loops
call ``check()`` between batches, so the other folds and chunks end within one step, where
they would otherwise run to their end while the process waits for them. A fold stopped so
resumes from its last checkpoint on the next run.

Standard library only: the core calls it without loading Prefect.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar

_EVENT: ContextVar[threading.Event | None] = ContextVar("darkroom_stop", default=None)


class Stopped(RuntimeError):
    """The run this work belongs to is stopping; a retry would not help."""


def requested() -> bool:
    event = _EVENT.get()
    return event is not None and event.is_set()


def check() -> None:
    """Raises Stopped when the run this code works for is stopping (else nothing; outside a
    scope, nothing ever)."""
    if requested():
        raise Stopped(
            "the run is stopping (SIGTERM, a cancelled run, or another task failed): this "
            "task ends here; a fold resumes from its last checkpoint on the next run"
        )


@contextlib.contextmanager
def scope() -> Iterator[threading.Event]:
    """A stop event for the tasks submitted inside the block, set when the block exits with
    an exception. Open it inside the task runner's block, so that it is set before the
    runner waits for its threads."""
    event = threading.Event()
    token = _EVENT.set(event)
    try:
        yield event
    except BaseException:
        event.set()
        raise
    finally:
        _EVENT.reset(token)


def exit_on_sigterm() -> None:
    """Makes SIGTERM unwind this process like Ctrl-C, with exit status 143: a flow that is
    running stops its folds or chunks and marks itself crashed first (Prefect's handler,
    which passes the signal on to this one), then leases are released and Prefect's temporary
    server is stopped on the way out."""
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame) -> None:
    print("darkroom: stopped by SIGTERM", file=sys.stderr)
    raise SystemExit(128 + signum)


def die_with_parent() -> bool:
    """Has Linux send this process SIGTERM when the thread that started it ends (the
    processes darkroom starts leave nothing behind when it is killed); False elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        return False
    return True
