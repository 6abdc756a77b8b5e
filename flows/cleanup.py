"""Retention: delete the model versions, fold checkpoints, index snapshots and reports that
the rules let go of (a dry run unless ``apply``). Deployed weekly with ``apply: true``
(deployments/prefect.yaml); the same as `darkroom cleanup --apply`."""

from __future__ import annotations

from prefect import flow

from darkroom.config import CleanupConfig
from darkroom.config.retention import CLEANUP_TIMEOUT_SECONDS
from tasks.cleanup import run_cleanup
from tasks.naming import flow_options


@flow(**flow_options("cleanup", "cleanup", CLEANUP_TIMEOUT_SECONDS))
def cleanup(config: CleanupConfig = CleanupConfig()) -> dict:
    """Never deletes the champion, the versions of the last promotion records, a version a
    running retrain or scoring run holds, predictions, or anything under labeled/ or
    incoming/. Returns the totals (bytes: freed, or that a dry run would free)."""
    return run_cleanup(config)


if __name__ == "__main__":
    print(cleanup())
