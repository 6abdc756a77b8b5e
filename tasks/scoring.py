"""Scoring tasks: plan the chunks, then one task per chunk of many images."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from darkroom import scoring
from tasks.common import retry_unless_permanent


@task(name="plan-chunks", retries=3, retry_delay_seconds=[5, 30, 120], cache_policy=NO_CACHE)
def plan_chunks(storage_uri: str, version: str, chunk_size: int, rescore: bool = False):
    return scoring.pending_chunks(storage_uri, version, chunk_size, rescore)


@task(
    task_run_name="score-chunk-{chunk_id}",
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def score_chunk(
    storage_uri: str,
    cache_dir: str,
    version: str,
    chunk_id: str,
    items: list[tuple[str, str]],
    device: str = "auto",
    batch_size: int = 64,
    topk: int = 5,
    num_workers: int = 0,
    tta: bool = False,
    low_confidence: float = 0.5,
) -> dict:
    return scoring.score_chunk(
        storage_uri,
        cache_dir,
        version,
        items,
        device,
        batch_size,
        topk,
        num_workers,
        tta,
        low_confidence,
    )
