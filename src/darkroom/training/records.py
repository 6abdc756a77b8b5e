"""The records a fold's run passes between its parts: the images it trains on and the limits of
their loaders (``FoldData``, ``LoaderLimits``), what training returns (``FoldResult``) and what
a finished fold reports (``FoldSummary``). Plain data, so every part of the loop can import it
without importing the loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from darkroom.data.images import DEFAULT_MAX_IMAGE_PIXELS


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
