"""What every darkroom task shares: which failures are worth a retry, and logging progress."""

from __future__ import annotations

from prefect import get_run_logger

from darkroom.index import DatasetError
from darkroom.training import NonFiniteLoss

# A retry cannot fix bad data, a diverged run or a bad config; it can fix I/O and preemption.
NOT_RETRIED = (DatasetError, NonFiniteLoss, ValueError, PermissionError)


def retry_unless_permanent(task, task_run, state) -> bool:
    try:
        state.result()
    except NOT_RETRIED:
        return False
    except Exception:
        return True
    return True


def log_progress(what: str, every: int = 10):
    """A progress callback (done, total) that logs every ``every`` percent."""
    logger = get_run_logger()
    last = [-1]

    def cb(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // every > last[0] or done == total:
            last[0] = pct // every
            logger.info("%s: %d/%d (%d%%)", what, done, total, pct)

    return cb
