"""MLflow tracking of a retrain (optional: the ``mlflow`` extra and ``MLFLOW_TRACKING_URI``;
docs/tracking.md). darkroom's registry stays the source of truth: MLflow down or slow costs a
warning, never the run."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from darkroom.config import RetrainConfig
from darkroom.registry import tracking
from darkroom.storage import open_storage


@task(name="track-retrain", task_run_name="track-{version}", cache_policy=NO_CACHE)
def track_retrain(config: RetrainConfig, version: str) -> str | None:
    """Logs the recorded candidate ``version`` to MLflow (a run, nested fold runs, the model
    version and its aliases). Returns the MLflow run id; None when tracking is off or failed
    (the failure is a warning in the log)."""
    storage = open_storage(config.storage)
    return tracking.log_retrain(storage, version, config.model_dump(mode="json"))
