"""Watch incoming/: announce new images with one darkroom.images.arrived event per tick.

Deployed on a short interval (deployments/prefect.yaml); score-new-images is triggered by the
event. Runs as a plain script too: `python flows/watch.py`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from darkroom.config import WATCH_TIMEOUT_SECONDS
from darkroom.scoring.watch import Tick, WatchConfig
from darkroom.storage import default_storage_uri
from tasks.naming import flow_options
from tasks.watch import check_incoming


@flow(**flow_options("watch-incoming", "watch", WATCH_TIMEOUT_SECONDS))
def watch_incoming(config: WatchConfig = WatchConfig()) -> Tick:
    """Lists incoming/ and emits darkroom.images.arrived with the count of new images, only
    when there are new ones."""
    result = check_incoming(config)
    logger = get_run_logger()
    if result.emitted:
        logger.info(
            "%d new images under %s/incoming/: emitted darkroom.images.arrived",
            result.new,
            config.storage or default_storage_uri(),
        )
    elif result.new and result.champion is None:
        logger.info(
            "%d images waiting under incoming/, but no champion to score them yet", result.new
        )
    else:
        logger.info(
            "no new images (%d incoming, %d already scored, %d already announced)",
            result.incoming,
            result.scored,
            result.announced,
        )
    return result


if __name__ == "__main__":
    print(watch_incoming())
