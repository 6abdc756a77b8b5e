"""A fold's checkpoint: where its training state is kept (a ``Checkpointer``) and when it is
written (``SaveSchedule``): at most every few minutes, so that short epochs do not each pay for
a full write, and always at the fold's end."""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from darkroom.storage import Storage


class Checkpointer(Protocol):
    """Where a fold keeps its training state between epochs (see ``darkroom.training.fold``)."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


class ReadOnly:
    """A checkpoint every rank of a fold on several processes resumes from, and only rank 0
    writes: the other ranks load through this."""

    def __init__(self, checkpoint: Checkpointer):
        self.checkpoint = checkpoint

    def load(self) -> dict | None:
        return self.checkpoint.load()

    def save(self, state: dict) -> None:
        pass


@dataclass
class Best:
    """The best epoch so far (the latest one without validation) and the epochs since: part of
    the checkpoint (its ``best``), so that a resumed fold keeps comparing against it."""

    loss: float = math.inf
    epoch: int = -1
    state: dict | None = None
    probs: np.ndarray | None = None
    bad_epochs: int = 0


def weights_copy(model: torch.nn.Module) -> dict:
    """A copy of ``model``'s state dict that later steps do not change."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class SaveSchedule:
    """Saves after an epoch once ``every`` seconds have passed since the last save (or the
    schedule's start; 0: every epoch), and always after the fold's last epoch."""

    checkpoint: Checkpointer | None
    every: float
    last: float = field(default_factory=time.monotonic)
    epoch: int = -1  # the last epoch saved

    def after_epoch(self, epoch: int, state: Callable[[bool], dict], end: bool) -> None:
        """``state(final)`` builds the checkpoint; ``end``: no epoch follows in this fold."""
        if end or time.monotonic() - self.last >= self.every:
            self.save(epoch, state, final=end)

    def save(self, epoch: int, state: Callable[[bool], dict], final: bool = False) -> None:
        """Saves ``epoch``'s state now, unless it is saved already."""
        if self.checkpoint is not None and epoch != self.epoch:
            self.checkpoint.save(state(final))
            self.last, self.epoch = time.monotonic(), epoch


class StorageCheckpointer:
    """A fold's training state in storage: one object, replaced whole at each save.
    ``sizes`` holds the bytes of every save, in order."""

    def __init__(self, storage: Storage, key: str):
        self.storage, self.key = storage, key
        self.sizes: list[int] = []

    def load(self) -> dict | None:
        try:
            data = self.storage.read_bytes(self.key)
        except FileNotFoundError:
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.storage.write_bytes(self.key, buf.getvalue())
        self.sizes.append(buf.tell())
