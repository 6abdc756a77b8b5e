"""Batch scoring of new images: read the champion once, find (key, etag) pairs it has not
scored, score them in chunks, one Parquet file per chunk under predictions/<version>/."""

from __future__ import annotations

from prefect import flow, get_run_logger

from darkroom import layout, lease, registry
from darkroom.config import SCORE_TIMEOUT_SECONDS, ScoreConfig
from darkroom.scoring import ChunkResult, ScorePlan, chunk_id
from darkroom.storage import open_storage
from tasks.common import flow_options
from tasks.reporting import publish_scoring
from tasks.scoring import plan_chunks, score_chunk


class NoChampion(RuntimeError):
    pass


@flow(**flow_options("score-new-images", "score", SCORE_TIMEOUT_SECONDS))
def score_new_images(config: ScoreConfig = ScoreConfig(), rescore: bool = False) -> dict:
    """Scores the incoming images no model has scored yet; with ``rescore``, every image the
    current champion has not scored (older versions' predictions stay)."""
    storage = open_storage(config.storage)
    with lease.held(storage, "score", config.lease_seconds):
        return _score(storage, config, rescore)


def _score(storage, config: ScoreConfig, rescore: bool) -> dict:
    champion, _ = registry.read_champion(storage)
    if champion is None:
        raise NoChampion(f"no champion at {storage.url(layout.CHAMPION)}: run a retrain first")
    version = champion["version"]  # read once: a promotion mid-run does not mix versions
    plan = plan_chunks(config, version, rescore)
    get_run_logger().info(
        "champion %s: %d incoming, %d already scored, %d to score in %d chunks",
        version,
        plan.incoming,
        plan.already_scored,
        plan.to_score,
        len(plan.chunks),
    )
    score = score_chunk.with_options(timeout_seconds=config.chunk_timeout_seconds)
    futures = [score.submit(config, version, chunk_id(c), c) for c in plan.chunks]
    summary = summarize_run(version, plan, [f.result() for f in futures])
    publish_scoring(summary)
    return summary


def summarize_run(version: str, plan: ScorePlan, results: list[ChunkResult]) -> dict:
    per_class: dict[str, int] = {}
    for r in results:
        for label, n in r.per_class.items():
            per_class[label] = per_class.get(label, 0) + n
    return {
        "version": version,
        "incoming": plan.incoming,
        "already_scored": plan.already_scored,
        "to_score": plan.to_score,
        "scored": sum(r.images for r in results),
        "failed": sum(r.failed for r in results),
        "low_confidence": sum(r.low_confidence for r in results),
        # not fetched: no row was written, so the next run scores them
        "unfetched": sum(r.unfetched for r in results),
        "chunks": len(results),
        "per_class": dict(sorted(per_class.items())),
        "files": [r.key for r in results if r.key],
    }


if __name__ == "__main__":
    print(score_new_images())
