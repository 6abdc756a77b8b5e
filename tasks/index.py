"""The index task: rebuild the labeled index snapshot."""

from __future__ import annotations

from prefect import get_run_logger

from darkroom.config import RetrainConfig
from darkroom.data import index
from darkroom.registry import changes as index_diff
from darkroom.storage import open_storage
from tasks.progress import log_progress
from tasks.retry import io_task


@io_task(name="rebuild-index", retries=2, retry_delay_seconds=10)
def rebuild_index(config: RetrainConfig, run_name: str) -> index.IndexResult:
    storage = open_storage(config.storage)
    result = index.rebuild_index(storage, config, run_name, log_progress("indexing images"))
    s = result.summary
    get_run_logger().info(
        "index %s: %d images, %d usable (%d train, %d holdout), %d classes, excluded %s",
        result.snapshot,
        s.images,
        s.usable,
        s.train,
        s.holdout,
        s.classes,
        s.excluded or "none",
    )
    return result


@io_task(name="data-changes", retries=2, retry_delay_seconds=10)
def data_changes(config: RetrainConfig, snapshot: str) -> index_diff.DataChanges:
    """What changed since the champion's snapshot, per class (a file beside the snapshot)."""
    changes = index_diff.changes_since_champion(open_storage(config.storage), snapshot)
    t = changes.total
    get_run_logger().info(
        "since %s: %d new, %d removed, %d relabelled, %d replaced images",
        changes.since or "no champion",
        t["new"],
        t["removed"],
        t["relabelled_in"],
        t["replaced"],
    )
    return changes
