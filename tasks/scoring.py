"""Scoring tasks: the champion's version, the compactions to finish, the plan, and one task per
chunk of many images (the flow takes the plan's chunks as it goes)."""

from __future__ import annotations

from darkroom.config import ScoreConfig
from darkroom.registry import pointer
from darkroom.scoring import chunks as scoring
from darkroom.scoring import compaction
from darkroom.scoring.plan import StreamedPlan
from darkroom.storage import open_storage
from tasks.retry import io_task


@io_task(name="read-champion")
def read_champion(config: ScoreConfig) -> str | None:
    """The champion's version; None when there is none yet."""
    champion, _ = pointer.read_champion(open_storage(config.storage))
    return champion.version if champion else None


@io_task(name="finish-compactions")
def finish_compactions(config: ScoreConfig) -> None:
    """Finishes a compaction stopped half-way: its duplicate rows go before a run plans."""
    compaction.finish(open_storage(config.storage))


@io_task(name="plan-chunks")
def plan_chunks(config: ScoreConfig, version: str, rescore: bool = False) -> StreamedPlan:
    """The run's plan. It is lazy, as before: ``incoming/`` is listed a chunk's worth at a time
    as the flow takes chunks, so the plan holds the chunks in flight, never the whole listing."""
    return StreamedPlan(open_storage(config.storage), version, config.chunk_size, rescore)


@io_task(task_run_name="score-chunk-{chunk_id}")
def score_chunk(
    config: ScoreConfig, version: str, chunk_id: str, items: list[tuple[str, str]]
) -> scoring.ChunkResult:
    """``chunk_id`` names the task run in the UI; the chunk's file carries the same id."""
    return scoring.score_chunk(open_storage(config.storage), config, version, items)
