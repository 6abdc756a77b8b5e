"""Configuration: one pydantic model per flow. Defaults live here; environments override them
in ``deployments/prefect.yaml``, the CLI, or the Prefect UI form."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TrainConfig(BaseModel):
    """How one model is trained. Every field here changes the trained weights."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("resnet18", description="Any timm model name.")
    pretrained: bool = Field(
        True,
        description="Start from the backbone's pretrained weights (timm, through the Hugging "
        "Face cache; or pretrained_file). Off: train from scratch.",
    )
    pretrained_file: str | None = Field(
        None,
        description="Backbone weights to start from (.safetensors/.pth): a local path or a "
        "storage URI (s3://..., file://...), loaded by timm; a head of another size is "
        "re-initialised.",
    )
    image_size: int = Field(224, ge=8, le=2048, description="Square input size in pixels.")
    batch_size: int = Field(32, ge=1, description="Training images per batch.")
    epochs: int = Field(5, ge=1, description="Passes over each fold's training rows.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (cosine from here to lr_min).")
    lr_min: float = Field(1e-5, ge=0, description="Learning rate at the end of the cosine.")
    weight_decay: float = Field(0.0, ge=0, description="The optimizer's weight decay.")
    folds: int = Field(5, ge=2, description="Stratified K-fold splits of the train rows.")
    seed: int = Field(42, description="Seeds every RNG and the fold assignment.")
    augment: Literal["soft", "no-flip", "none"] = Field(
        "soft",
        description="soft: rotate 45, h-flip, one 64 px hole; no-flip: the same without the "
        "flip (text, digits); none: resize only.",
    )
    metric: Literal["accuracy", "f1_macro"] = Field(
        "accuracy", description="Picks the best fold and decides promotion."
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam",
        description="adam (the tutorials'), adamw (decoupled weight decay), or sgd "
        "(momentum 0.9, Nesterov).",
    )
    freeze_backbone_epochs: int = Field(
        0,
        ge=0,
        description="Train only the new classifier head for this many epochs, then "
        "unfreeze everything (transfer learning).",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="Stop after this many epochs without a lower validation loss "
        "(0: never stop early). The best epoch's weights are kept either way.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: weight the loss by n_images / (n_classes * class count) "
        "of the fold's training rows.",
    )
    mixup_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a training batch is mixed with MixUp (alpha 0.2).",
    )
    cutmix_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a training batch is mixed with CutMix "
        "(alpha 1.0); mixup_prob + cutmix_prob must not exceed 1.",
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Batches per optimizer step (effective batch = batch_size x this)."
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="CUDA only (ignored on a CPU). auto: bf16 where the GPU supports it, "
        "else fp16 with a gradient scaler.",
    )
    channels_last: bool = Field(True, description="NHWC memory layout on CUDA (faster convs).")
    compile: bool = Field(False, description="torch.compile the model on CUDA.")
    final_model: Literal["best_fold", "ensemble", "refit"] = Field(
        "best_fold",
        description="best_fold: the best fold's weights; ensemble: every fold's "
        "model, probabilities averaged; refit: one model on all train rows for the folds' mean "
        "best epoch count.",
    )

    @field_validator("lr_min")
    @classmethod
    def _lr_min_below_lr(cls, v, info):
        lr = info.data.get("lr")
        if lr is not None and v > lr:
            raise ValueError(f"lr_min ({v}) must not exceed lr ({lr})")
        return v

    @model_validator(mode="after")
    def _mix_probs_add_up(self):
        if self.mixup_prob + self.cutmix_prob > 1:
            raise ValueError(
                f"mixup_prob + cutmix_prob ({self.mixup_prob} + {self.cutmix_prob})"
                " must not exceed 1"
            )
        return self

    def fingerprint(self) -> str:
        """A short hash of every field and the code version: same fingerprint, same training.

        The code version is in it so that a release that changes training retrains.
        """
        from darkroom import __version__

        blob = json.dumps({**self.model_dump(mode="json"), "_code": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class StorageConfig(BaseModel):
    """Which storage root a flow works on (the watcher needs no more than this)."""

    model_config = ConfigDict(extra="forbid")

    storage: str | None = Field(
        None,
        description="Storage root: file://PATH or s3://BUCKET/PREFIX. Empty: $DARKROOM_STORAGE "
        "where the run executes, else file://./data/bucket.",
    )


class RuntimeConfig(StorageConfig):
    """Where and how to run; does not change results."""

    cache_dir: str | None = Field(
        None,
        description="Local cache of synced images (default: $DARKROOM_CACHE or "
        "~/.cache/darkroom/<root hash>).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1...")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    download_concurrency: int = Field(
        32,
        ge=1,
        description="Parallel downloads from S3 (one GET each) and the size of the S3 client's "
        "connection pool; a local root is read in place, with no threads.",
    )
    lease_seconds: int = Field(
        300,
        ge=10,
        description="A run holds a lease on the storage root (renewed every third of this), so "
        "a second retrain or scoring run there stops; a killed run's lease expires after this.",
    )
    loader_timeout_seconds: float = Field(
        300,
        gt=0,
        description="A DataLoader worker that returns no batch for this long fails the epoch "
        "(the fold's retry resumes from its checkpoint).",
    )
    task_runner: Literal["threads", "ray"] = Field(
        "threads",
        description="Where folds and scoring chunks run: threads (Prefect's thread pool on "
        "this machine) or ray (a Ray cluster through prefect-ray: one GPU per fold, a share of "
        "one per scoring chunk).",
    )
    ray_address: str | None = Field(
        None,
        description="The Ray cluster for task_runner=ray (ray://HOST:10001, or auto). Empty: "
        "$RAY_ADDRESS where the flow runs, else a local Ray instance started for the run.",
    )
    max_image_pixels: int = Field(
        178_956_970,
        ge=1,
        description="Images with more pixels (read from the header, before decoding) are "
        "quarantined (index) or rejected (scoring); Pillow's decompression-bomb limit.",
    )

    def cache_path(self, root_uri: str) -> Path:
        """The local cache of the images of the storage root ``root_uri``: ``cache_dir``, else
        one folder per root under $DARKROOM_CACHE (default ~/.cache/darkroom)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        base = Path(os.environ.get("DARKROOM_CACHE", Path.home() / ".cache" / "darkroom"))
        return base / hashlib.sha256(root_uri.encode()).hexdigest()[:16]


# Whole-run limits (Prefect sets a flow's timeout where the flow is defined, not per run);
# the per-task limits are config fields below.
RETRAIN_TIMEOUT_SECONDS = 24 * 3600
SCORE_TIMEOUT_SECONDS = 12 * 3600
WATCH_TIMEOUT_SECONDS = 15 * 60


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
