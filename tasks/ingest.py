"""Sync and index tasks."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from darkroom import pipeline
from tasks.common import log_progress, retry_unless_permanent


@task(
    name="sync-labeled",
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def sync_labeled(storage_uri: str, cache_dir: str, concurrency: int = 16) -> dict:
    report = pipeline.sync_labeled(
        storage_uri, cache_dir, concurrency, progress=log_progress("downloading labeled images")
    )
    logger = get_run_logger()
    logger.info(
        "sync labeled/: listed %(listed)d, new %(new)d, changed %(changed)d, removed "
        "%(removed)d, unchanged %(unchanged)d, refused %(refused)d, failed %(failed)d",
        report,
    )
    for key in report["refused_keys"]:
        logger.warning("refused unsafe key %r (it would escape the cache directory)", key)
    return report


@task(
    name="rebuild-index",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def rebuild_index(
    storage_uri: str,
    cache_dir: str,
    folds: int,
    seed: int,
    holdout_fraction: float,
    run_name: str = "",
) -> dict:
    pointer = pipeline.rebuild_index(
        storage_uri,
        cache_dir,
        folds,
        seed,
        holdout_fraction,
        run_name,
        progress=log_progress("indexing images"),
    )
    s = pointer["summary"]
    get_run_logger().info(
        "index %s: %d images, %d usable (%d train, %d holdout), %d classes, excluded %s",
        pointer["snapshot"],
        s["images"],
        s["usable"],
        s["train"],
        s["holdout"],
        s["classes"],
        s["excluded"] or "none",
    )
    return pointer
