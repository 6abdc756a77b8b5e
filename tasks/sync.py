"""The sync task: mirror labeled/ into the local cache."""

from __future__ import annotations

from prefect import get_run_logger

from darkroom.config import RetrainConfig
from darkroom.data import sync
from darkroom.storage import open_storage
from tasks.progress import log_progress
from tasks.retry import io_task


@io_task(name="sync-labeled")
def sync_labeled(config: RetrainConfig) -> sync.SyncReport:
    progress = log_progress("downloading labeled images")
    report = sync.sync_labeled(open_storage(config.storage), config, progress)
    logger = get_run_logger()
    logger.info(report.summary())
    for key, why in report.refused_reasons.items():
        logger.warning("refused %s: %s", key, why["error"])
    return report
