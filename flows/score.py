"""Batch scoring of new images: read the champion once, find (key, etag) pairs it has not
scored, score them in chunks, one Parquet file per chunk under predictions/<version>/."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from prefect import flow, get_run_logger

from darkroom import layout
from darkroom.config import SCORE_TIMEOUT_SECONDS, ScoreConfig
from darkroom.scoring.chunks import ChunkResult
from darkroom.scoring.plan import StreamedPlan, chunk_id
from darkroom.storage import lease, open_storage
from tasks.monitoring import check_drift
from tasks.naming import flow_options
from tasks.reporting import publish_scoring
from tasks.runners import (
    chunk_resources,
    chunks_in_flight,
    for_workers,
    running,
    submit_bounded,
)
from tasks.scoring import finish_compactions, plan_chunks, read_champion, score_chunk


class NoChampion(RuntimeError):
    pass


@flow(**flow_options("score-new-images", "score", SCORE_TIMEOUT_SECONDS))
def score_new_images(config: ScoreConfig = ScoreConfig(), rescore: bool = False) -> dict:
    """Scores the incoming images no model has scored yet; with ``rescore``, every image the
    current champion has not scored (older versions' predictions stay)."""
    storage = open_storage(config.storage)
    with lease.held(storage, "score", config.lease_seconds) as held:
        version = read_champion(config)  # read once: a promotion mid-run does not mix versions
        if version is None:
            where = storage.url(layout.CHAMPION)
            raise NoChampion(f"no champion at {where}: run a retrain first")
        held.hold(version)  # the lease names it: darkroom cleanup keeps it while this runs
        return _score(config, version, rescore)


def _score(config: ScoreConfig, version: str, rescore: bool) -> dict:
    finish_compactions(config)  # a compaction stopped half-way: its duplicates go first
    plan = plan_chunks(config, version, rescore)
    chunks = plan.chunks()
    first = next(chunks, None)  # nothing to score: no runner (no Ray) is started
    summary = Summary(version)
    if first is not None:
        score = score_chunk.with_options(timeout_seconds=config.chunk_timeout_seconds)
        refs = {"config": for_workers(config), "version": version}
        calls = (
            {**refs, "chunk_id": chunk_id(c), "items": c} for c in itertools.chain([first], chunks)
        )
        with running(config) as runner:
            limit = chunks_in_flight(config)  # on Ray: from the cluster, once connected
            resources = chunk_resources(config, limit)
            for future in submit_bounded(runner, score, calls, limit, resources):
                summary.add(future.result())
            get_run_logger().info("scored %d chunks, at most %d at once", summary.chunks, limit)
    result = summary.as_dict(plan)
    get_run_logger().info(
        "champion %s: %d incoming, %d already scored, %d scored now, %d failed",
        version,
        plan.incoming,
        plan.already_scored,
        result["scored"],
        result["failed"],
    )
    publish_scoring(result)
    if result["scored"] and config.drift.enabled:
        result["drift"] = check_drift(config, version, result["files"])
    return result


@dataclass
class Summary:
    """The run's totals, added up one chunk result at a time."""

    version: str
    scored: int = 0
    failed: int = 0
    low_confidence: int = 0
    unfetched: int = 0
    chunks: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def add(self, r: ChunkResult) -> None:
        self.scored += r.images
        self.failed += r.failed
        self.low_confidence += r.low_confidence
        self.unfetched += r.unfetched
        self.chunks += 1
        for label, n in r.per_class.items():
            self.per_class[label] = self.per_class.get(label, 0) + n
        if r.key:
            self.files.append(r.key)

    def as_dict(self, plan: StreamedPlan) -> dict:
        return {
            "version": self.version,
            "incoming": plan.incoming,
            "already_scored": plan.already_scored,
            "to_score": plan.to_score,
            "scored": self.scored,
            "failed": self.failed,
            "low_confidence": self.low_confidence,
            # not fetched: no row was written, so the next run scores them
            "unfetched": self.unfetched,
            "chunks": self.chunks,
            "per_class": dict(sorted(self.per_class.items())),
            "files": sorted(self.files),
        }


if __name__ == "__main__":
    print(score_new_images())
