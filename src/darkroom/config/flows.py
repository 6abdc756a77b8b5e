"""The parameters of the retrain and scoring flows: runtime settings plus the recipe and the
gate (retrain), or the batch settings (scoring)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from darkroom.config.monitoring import DriftConfig, ReferenceConfig
from darkroom.config.runtime import RETRAIN_TIMEOUT_SECONDS, RuntimeConfig
from darkroom.config.train import TrainConfig


class RetrainConfig(RuntimeConfig):
    """Parameters of the ``nightly_retrain`` flow."""

    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes of a training process, or auto: one per core "
        "less one for the training step (none on 2 cores or fewer). Started once and reused by "
        "the folds that train in that process.",
    )
    decoded_cache_gib: float = Field(
        50.0,
        ge=0,
        description="Disk the decode-once cache may take (<cache_dir>/decoded: each training "
        "image decoded and resized once, reused by every fold, epoch and later run), in GiB; "
        "the least recently used entries go first. 0: no cache, every epoch decodes the files.",
    )

    train: TrainConfig = Field(
        default_factory=TrainConfig, description="How the model is trained (the recipe)."
    )
    reference: ReferenceConfig = Field(
        default_factory=ReferenceConfig,
        description="What each version keeps to judge later batches by (reference.npz).",
    )
    holdout_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="Share of labeled images held out for the gate (by content hash: an "
        "image never changes side).",
    )
    force: bool = Field(False, description="Train even if data and config did not change.")
    min_delta: float = Field(
        0.0,
        ge=0,
        description="Promote only if the challenger beats the champion's primary "
        "metric (train.metric) on the holdout by more than this.",
    )
    tta: bool = Field(False, description="Holdout evaluation averages image and h-flip.")
    max_class_recall_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Reject a challenger if any class's holdout recall falls "
        "by more than this versus the champion.",
    )
    min_metric: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The first champion must reach at least this primary metric on the holdout.",
    )
    baseline_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="The first champion must beat the majority-class baseline's primary "
        "metric on the holdout by at least this.",
    )
    max_p_value: float = Field(
        0.05,
        gt=0,
        le=1,
        description="A challenger must beat the champion significantly: the exact McNemar "
        "test on the paired holdout predictions must give a p-value below this (1: off).",
    )
    require_approval: bool = Field(
        False,
        description="A candidate the gate accepts waits for a person before it becomes the "
        "champion: the run pauses (Paused in the Prefect UI) with the decision's figures and a "
        "form to approve or reject it, with a note. Approval never overrides a gate that "
        "rejected.",
    )
    approval_timeout_seconds: int = Field(
        12 * 3600,
        ge=5,
        le=RETRAIN_TIMEOUT_SECONDS // 2,
        description="With require_approval: a candidate nobody answers for within this long is "
        "not promoted (the run ends Failed: Prefect's pause timed out). At most half the run's "
        "own 24 h limit, which covers the training too.",
    )
    max_failed_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of labeled objects allowed to fail to download before the retrain "
        "stops (0: every object or nothing).",
    )
    fold_timeout_seconds: int = Field(
        6 * 3600,
        ge=60,
        description="A fold still training after this long fails; its retry resumes from the "
        "last checkpoint.",
    )
    max_folds_in_flight: int | None = Field(
        None,
        ge=1,
        description="Folds training at once. Empty: with threads, one per visible GPU (1 on "
        "a CPU); with ray, every fold, as the cluster's GPUs allow.",
    )
    devices_per_fold: int = Field(
        1,
        ge=1,
        description="Devices one fold trains on at once, one process each (torchrun-style "
        "DistributedDataParallel: nccl on GPUs, gloo on a CPU); train.batch_size is split "
        "over them. The fold then holds this many GPUs (threads: slots and locks; ray: "
        "num_gpus).",
    )
    checkpoint_every_seconds: float = Field(
        300,
        ge=0,
        description="A fold saves its resume state (weights, optimizer) after an epoch at most "
        "this often, and at its end: a killed fold loses at most this much training "
        "(0: after every epoch).",
    )

    @model_validator(mode="after")
    def _batch_splits_over_devices(self):
        n, batch = self.devices_per_fold, self.train.batch_size
        if batch % n:
            raise ValueError(
                f"train.batch_size ({batch}) must be a multiple of devices_per_fold ({n}): "
                f"each of the fold's {n} processes takes batch_size / {n} images a batch"
            )
        return self


class ScoreConfig(RuntimeConfig):
    """Parameters of the ``score_new_images`` flow."""

    batch_size: int = Field(64, ge=1, description="Images per forward pass.")
    chunk_size: int = Field(512, ge=1, description="Images per scoring task (one file each).")
    topk: int = Field(5, ge=1, description="Top classes (labels and probabilities) per row.")
    tta: bool = Field(False, description="Average the image and its horizontal flip.")
    low_confidence: float = Field(
        0.5, ge=0, le=1, description="Rows whose top probability is below this are flagged."
    )
    drift: DriftConfig = Field(
        default_factory=DriftConfig,
        description="The drift report of each run against the champion's reference.",
    )
    chunk_timeout_seconds: int = Field(
        1800, ge=10, description="A scoring chunk still running after this long fails (retried)."
    )
    max_chunks_in_flight: int | None = Field(
        None,
        ge=1,
        description="Scoring chunks running at once; the next chunk is planned and submitted "
        "as one finishes. Empty: one per GPU (threads: visible here; ray: the cluster's), "
        "else one per CPU core.",
    )
