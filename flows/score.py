"""Batch scoring of new images: read the champion once, find (key, etag) pairs it has not
scored, score them in chunks, one Parquet file per chunk under predictions/<version>/."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from darkroom import registry
from darkroom.config import ScoreConfig, cache_dir_for
from darkroom.scoring import chunk_id
from darkroom.storage import open_storage
from tasks.common import run_name
from tasks.scoring import plan_chunks, score_chunk


class NoChampion(RuntimeError):
    pass


@flow(name="score-new-images", flow_run_name=run_name("score"), log_prints=True)
def score_new_images(config: ScoreConfig | None = None, rescore: bool = False) -> dict:
    """Scores the incoming images no model has scored yet; with ``rescore``, every image the
    current champion has not scored (older versions' predictions stay)."""
    config = config or ScoreConfig()
    logger = get_run_logger()
    storage = open_storage(config.storage)
    champion, _ = registry.read_champion(storage)
    if champion is None:
        raise NoChampion(f"no champion at {storage.url(registry.CHAMPION)}: run a retrain first")
    version = champion["version"]  # read once: a promotion mid-run does not mix versions
    cache = str(cache_dir_for(config))
    chunks, counts = plan_chunks(storage.uri, version, config.chunk_size, rescore)
    logger.info(
        "champion %s: %d incoming, %d already scored, %d to score in %d chunks",
        version,
        counts["incoming"],
        counts["already_scored"],
        counts["to_score"],
        len(chunks),
    )
    futures = [
        score_chunk.submit(
            storage.uri,
            cache,
            version,
            chunk_id(c),
            c,
            config.device,
            config.batch_size,
            config.topk,
            config.num_workers,
            config.tta,
            config.low_confidence,
        )
        for c in chunks
    ]
    results = [f.result() for f in futures]
    summary = summarize_run(version, counts, results)
    create_markdown_artifact(
        summary_markdown(summary), key="scoring-summary", description=f"Scoring run with {version}"
    )
    return summary


def summarize_run(version: str, counts: dict, results: list[dict]) -> dict:
    per_class: dict[str, int] = {}
    for r in results:
        for label, n in r["per_class"].items():
            per_class[label] = per_class.get(label, 0) + n
    return {
        "version": version,
        **counts,
        "scored": sum(r["images"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "low_confidence": sum(r["low_confidence"] for r in results),
        "chunks": len(results),
        "per_class": dict(sorted(per_class.items())),
        "files": [r["key"] for r in results],
    }


def summary_markdown(s: dict) -> str:
    lines = [
        f"# Scored with `{s['version']}`",
        "",
        "| incoming | skipped (already scored) | scored | failed | low confidence |",
        "|---|---|---|---|---|",
        f"| {s['incoming']} | {s['already_scored']} | {s['scored']} | {s['failed']} | "
        f"{s['low_confidence']} |",
        "",
        "| predicted class | images |",
        "|---|---|",
    ]
    lines += [f"| {c} | {n} |" for c, n in s["per_class"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(score_new_images())
