"""Configuration: one pydantic model per flow. Defaults live here; environments override them
in ``deployments/prefect.yaml``, the CLI, or the Prefect UI form."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from darkroom.storage import default_storage_uri


class TrainConfig(BaseModel):
    """How one model is trained. Every field here changes the trained weights."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("resnet18", description="Any timm model name.")
    pretrained: bool = Field(False, description="Load pretrained weights (HF hub cache).")
    pretrained_file: str | None = Field(
        None, description="Local path to backbone weights (.safetensors/.pth), loaded by timm."
    )
    image_size: int = Field(224, ge=8, le=2048)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(5, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_min: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    folds: int = Field(5, ge=2, description="Stratified K-fold splits of the train rows.")
    seed: int = 42
    augment: Literal["soft", "no-flip", "none"] = Field(
        "soft",
        description="soft: rotate 45, h-flip, one 64 px hole; no-flip: the same without the "
        "flip (text, digits); none: resize only.",
    )
    metric: Literal["accuracy", "f1_macro"] = Field(
        "accuracy", description="Picks the best fold and decides promotion."
    )

    @field_validator("lr_min")
    @classmethod
    def _lr_min_below_lr(cls, v, info):
        lr = info.data.get("lr")
        if lr is not None and v > lr:
            raise ValueError(f"lr_min ({v}) must not exceed lr ({lr})")
        return v

    def fingerprint(self) -> str:
        """A short hash of every field: same fingerprint, same training."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class RuntimeConfig(BaseModel):
    """Where and how to run; does not change results."""

    model_config = ConfigDict(extra="forbid")

    storage: str = Field(default_factory=default_storage_uri, description="file://... or s3://...")
    cache_dir: str | None = Field(
        None, description="Local cache of synced images (default: $DARKROOM_CACHE or "
        "~/.cache/darkroom/<root hash>)."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1...")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    download_concurrency: int = Field(16, ge=1)


class RetrainConfig(RuntimeConfig):
    """Parameters of the ``nightly_retrain`` flow."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    force: bool = Field(False, description="Train even if data and config did not change.")
    min_delta: float = Field(
        0.0, ge=0, description="Promote only if the challenger beats the champion's primary "
        "metric (train.metric) on the holdout by more than this."
    )
    max_class_recall_drop: float = Field(
        0.05, ge=0, le=1, description="Reject a challenger if any class's holdout recall falls "
        "by more than this versus the champion."
    )


class ScoreConfig(RuntimeConfig):
    """Parameters of the ``score_new_images`` flow."""

    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(512, ge=1, description="Images per scoring task (one file each).")
    topk: int = Field(5, ge=1)
    tta: bool = Field(False, description="Average the image and its horizontal flip.")
    low_confidence: float = Field(
        0.5, ge=0, le=1, description="Rows whose top probability is below this are flagged."
    )
    rescore: bool = Field(False, description="Score every image again for the champion.")


def cache_dir_for(cfg: RuntimeConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = Path(os.environ.get("DARKROOM_CACHE", Path.home() / ".cache" / "darkroom"))
    from darkroom.storage import open_storage

    root = open_storage(cfg.storage).uri
    return base / hashlib.sha256(root.encode()).hexdigest()[:16]
