"""Scoring tasks: one task per chunk of many images (the flow plans the chunks as it goes)."""

from __future__ import annotations

from darkroom.config import ScoreConfig
from darkroom.scoring import chunks as scoring
from darkroom.storage import open_storage
from tasks.common import io_task


@io_task(task_run_name="score-chunk-{chunk_id}")
def score_chunk(
    config: ScoreConfig, version: str, chunk_id: str, items: list[tuple[str, str]]
) -> scoring.ChunkResult:
    """``chunk_id`` names the task run in the UI; the chunk's file carries the same id."""
    return scoring.score_chunk(open_storage(config.storage), config, version, items)
