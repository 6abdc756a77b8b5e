"""Configuration: one pydantic model per flow. Defaults live here; environments override them
in ``deployments/prefect.yaml``, the CLI, or the Prefect UI form."""

from darkroom.config.decisions import GateConfig, PromoteVersionConfig, RollbackConfig
from darkroom.config.flows import RetrainConfig, ScoreConfig
from darkroom.config.labeling import LabelQueueConfig
from darkroom.config.monitoring import DriftConfig, ReferenceConfig
from darkroom.config.retention import CleanupConfig
from darkroom.config.runtime import (
    RETRAIN_TIMEOUT_SECONDS,
    SCORE_TIMEOUT_SECONDS,
    WATCH_TIMEOUT_SECONDS,
    RuntimeConfig,
    StorageConfig,
)
from darkroom.config.train import TrainConfig

__all__ = [
    "CleanupConfig",
    "DriftConfig",
    "ReferenceConfig",
    "RETRAIN_TIMEOUT_SECONDS",
    "SCORE_TIMEOUT_SECONDS",
    "WATCH_TIMEOUT_SECONDS",
    "LabelQueueConfig",
    "GateConfig",
    "PromoteVersionConfig",
    "RollbackConfig",
    "RetrainConfig",
    "RuntimeConfig",
    "ScoreConfig",
    "StorageConfig",
    "TrainConfig",
]
