"""Batch scoring of new images: read the champion once, find (key, etag) pairs it has not
scored, score them in chunks, one Parquet file per chunk under predictions/<version>/."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from darkroom import registry
from darkroom.config import ScoreConfig, cache_dir_for
from darkroom.scoring import chunk_id
from darkroom.storage import open_storage
from tasks.scoring import plan_chunks, score_chunk


class NoChampion(RuntimeError):
    pass


@flow(name="score-new-images", log_prints=True)
def score_new_images(config: ScoreConfig | None = None, rescore: bool = False) -> dict:
    """Scores every incoming image the champion has not scored yet (all of them with rescore)."""
    config = config or ScoreConfig()
    logger = get_run_logger()
    storage = open_storage(config.storage)
    champion, _ = registry.read_champion(storage)
    if champion is None:
        raise NoChampion(f"no champion at {storage.url(registry.CHAMPION)}: run a retrain first")
    version = champion["version"]  # read once: a promotion mid-run does not mix versions
    cache = str(cache_dir_for(config))
    chunks, counts = plan_chunks(storage.uri, version, config.chunk_size, rescore)
    logger.info("champion %s: %d incoming, %d already scored, %d to score in %d chunks",
                version, counts["incoming"], counts["already_scored"], counts["to_score"],
                len(chunks))
    futures = [score_chunk.submit(storage.uri, cache, version, chunk_id(c), c, config.device,
                                  config.batch_size, config.topk, config.num_workers)
               for c in chunks]
    results = [f.result() for f in futures]
    per_class: dict[str, int] = {}
    for r in results:
        for label, n in r["per_class"].items():
            per_class[label] = per_class.get(label, 0) + n
    summary = {"version": version, **counts, "scored": sum(r["images"] for r in results),
               "failed": sum(r["failed"] for r in results), "chunks": len(results),
               "per_class": dict(sorted(per_class.items())),
               "files": [r["key"] for r in results]}
    create_markdown_artifact(
        f"# Scored with `{version}`\n\n| incoming | already scored | scored | failed |\n"
        f"|---|---|---|---|\n| {counts['incoming']} | {counts['already_scored']} | "
        f"{summary['scored']} | {summary['failed']} |\n\nPer class: {summary['per_class']}\n",
        key="scoring-summary", description=f"Scoring run with {version}")
    return summary


if __name__ == "__main__":
    print(score_new_images())
