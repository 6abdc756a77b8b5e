"""Configuration: one pydantic model per flow. Defaults live here; environments override them
in ``deployments/prefect.yaml``, the CLI, or the Prefect UI form."""

from darkroom.config.flows import RetrainConfig, ScoreConfig
from darkroom.config.runtime import (
    RETRAIN_TIMEOUT_SECONDS,
    SCORE_TIMEOUT_SECONDS,
    WATCH_TIMEOUT_SECONDS,
    RuntimeConfig,
    StorageConfig,
)
from darkroom.config.train import TrainConfig

__all__ = [
    "RETRAIN_TIMEOUT_SECONDS",
    "SCORE_TIMEOUT_SECONDS",
    "WATCH_TIMEOUT_SECONDS",
    "RetrainConfig",
    "RuntimeConfig",
    "ScoreConfig",
    "StorageConfig",
    "TrainConfig",
]
