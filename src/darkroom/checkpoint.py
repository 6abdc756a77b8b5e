"""A fold's checkpoint: where its training state is kept (a ``Checkpointer``) and when it is
written (``SaveSchedule``): at most every few minutes, so that short epochs do not each pay for
a full write, and always at the fold's end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Checkpointer(Protocol):
    """Where a fold keeps its training state between epochs (see ``darkroom.train``)."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


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
