"""The records a fold's run passes between its parts: the images it trains on and the limits of
their loaders (``FoldData``, ``LoaderLimits``), the run the fold hands down to the loop
(``FoldRun``), an epoch's history row (``EpochRow``), what training returns (``FoldResult``),
what a finished fold reports (``FoldSummary``) and what a finished candidate reports
(``CandidateReport``). Plain data, so every part of the loop can import it without importing
the loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

from darkroom.data.images import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from darkroom.config import RetrainConfig, TrainConfig
    from darkroom.training.checkpoint import Checkpointer


@dataclass(frozen=True)
class LoaderLimits:
    """What a loader refuses to wait for or to decode."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    worker_timeout: float = 300.0


@dataclass
class FoldData:
    """The images of one fold; no validation images means a refit on every row. ``decoded``:
    the paths are decode-once cache entries at the config's image_size (darkroom.data.cache)."""

    train_paths: Sequence[str]
    train_labels: Sequence[int]
    val_paths: Sequence[str]
    val_labels: Sequence[int]
    num_classes: int
    limits: LoaderLimits = field(default_factory=LoaderLimits)
    decoded: bool = False


@dataclass(frozen=True, kw_only=True)
class EpochRow:
    """One epoch of a fold: what ``on_epoch`` is given, and (as ``record()``) the row of the
    history that checkpoints and fold.json keep. No validation (the refit): no ``val_``."""

    epoch: int
    lr: float
    frozen_backbone: bool
    train_loss: float
    train_accuracy: float
    train_f1_macro: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_f1_macro: float | None = None
    seconds: float

    def record(self) -> dict:
        """The history row as stored (JSON, checkpoints): the fields that have a value."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: dict) -> EpochRow:
        return cls(**record)


@dataclass(frozen=True)
class FoldRun:
    """One fold's run, as the fold hands it down to the loop: on one device (``fit``) or on
    several processes (``launch``)."""

    data: FoldData
    config: RetrainConfig  # its ``train`` is this fold's recipe (the refit's epoch count)
    device: str  # auto, cpu, cuda, or the GPUs this fold holds (``cuda:2,3``)
    on_epoch: Callable[[EpochRow], None] | None = None
    checkpoint: Checkpointer | None = None  # the fold's StorageCheckpointer

    @property
    def train(self) -> TrainConfig:
        return self.config.train


@dataclass
class FoldResult:
    """The best epoch's weights (the last epoch's without validation) and how it got there."""

    model: (
        torch.nn.Module | None
    )  # None where another process trained it (darkroom.training.launch)
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    val_probs: np.ndarray | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    resumed_from_epoch: int = 0  # first epoch this call trained (0: started from scratch)
    batch_size: int = 0  # after any out-of-memory halving
    grad_accum_steps: int = 1
    stopped_early: bool = False
    ranks: list[dict] = field(default_factory=list)  # a fold on several processes: each one


@dataclass
class FoldSummary:
    """What a trained fold reports (``fold.json`` adds its history and full metrics)."""

    fold: int
    version: str
    refit: bool
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int
    batch_size: int
    grad_accum_steps: int
    train_images: int
    val_images: int
    seconds: float
    device: str
    weights: str
    sha256: str
    mean: list[float]
    std: list[float]
    metrics: dict = field(default_factory=dict)
    reused: bool = False
    ranks: list[dict] = field(default_factory=list)  # devices_per_fold > 1: each process

    @classmethod
    def from_record(cls, record: dict) -> FoldSummary:
        """From a fold.json (which holds more than the summary)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


@dataclass(frozen=True)
class CandidateReport:
    """What ``finalize_candidate`` wrote for a candidate (model.json holds the rest)."""

    version: str
    final_model: str  # best_fold, ensemble or refit
    chosen_fold: int  # the best fold by the selection metric
    sha256: str  # of the candidate's model.safetensors
    cv: dict[str, dict[str, float]]  # metric -> mean and std across the folds
    members: list[str] = field(default_factory=list)  # an ensemble's member weights
    refit_epochs: int | None = None  # final_model="refit": the epochs the refit trained
    label_issues: LabelIssueSummary | None = None  # training labels that look wrong


@dataclass(frozen=True)
class LabelIssueSummary:
    """What a report found: how many images, the estimated share of wrong labels among the
    training images, and the top rows (key, given, suggested, confidences)."""

    version: str
    examined: int
    count: int
    noise_rate: float
    top: list[dict]

    def as_dict(self) -> dict:
        return asdict(self)
