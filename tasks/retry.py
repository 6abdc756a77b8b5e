"""Which failures a darkroom task retries: I/O and preemption, never what a retry cannot fix
(bad data, a diverged run, a bad config, a run that is stopping)."""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from darkroom.ops.stopping import Stopped
from darkroom.storage import StorageSetupError


def not_retried() -> tuple[type[Exception], ...]:
    """What a retry cannot fix: bad data, a diverged run, a bad config, or a run that is
    stopping (it can fix I/O and preemption). Imported when first needed: a flow's start-up
    does not load torch for it."""
    from darkroom.data.labels import DatasetError
    from darkroom.training.steps import NonFiniteLoss

    return (DatasetError, NonFiniteLoss, Stopped, StorageSetupError, ValueError, PermissionError)


def __getattr__(name: str):
    if name == "NOT_RETRIED":
        return not_retried()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def retry_unless_permanent(task, task_run, state) -> bool:
    try:
        state.result()
    except not_retried():
        return False
    except Exception:
        return True
    return True


class _ThreadTimeoutNote(logging.Filter):
    """Drops Prefect's warning, logged at the start of every task with a timeout on a worker
    thread, that such a timeout waits for a blocking call to return. darkroom's folds and
    chunks are loops of short steps whose storage calls have timeouts of their own, so the
    timeout stops them within a step (tests/flows/test_timeouts.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of %s seconds configured for this task")


def io_task(**overrides):
    """A task that does I/O: retried with backoff unless the error is permanent, never cached
    (inputs are references; the outputs live in storage). ``overrides`` replace the defaults.
    Its timeout is honoured on worker threads, so Prefect's note on them is dropped."""
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _ThreadTimeoutNote) for f in task_runs.filters):
        task_runs.addFilter(_ThreadTimeoutNote())
    defaults = dict(
        retries=3,
        retry_delay_seconds=[5, 30, 120],
        retry_condition_fn=retry_unless_permanent,
        cache_policy=NO_CACHE,
    )
    return task(**{**defaults, **overrides})
