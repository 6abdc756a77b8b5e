"""One fold on several devices: a process's place among the DistributedDataParallel processes
of a fold (started by ``darkroom.training.launch``) and what they do together. With one process (the
default ``Ranks()``) every method is the identity and nothing touches ``torch.distributed``.

What keeps the ranks in step: the same seed builds the same model (DDP broadcasts rank 0's
anyway), a DistributedSampler gives each rank a stride of the same per-epoch shuffle, gradients
are averaged in backward, rank 0's BatchNorm statistics are copied to every rank after each
epoch, and validation is gathered whole on every rank, so early stopping decides alike."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from darkroom.training.rng import seed_everything
from darkroom.training.steps import predict_proba, prob_stats

if TYPE_CHECKING:
    from darkroom.training.records import FoldData

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
# How long a rank waits for the others, in init_process_group and in every collective: far
# longer than rank 0's checkpoint write, far shorter than a fold's own timeout.
TIMEOUT = timedelta(minutes=30)


@dataclass
class Ranks:
    """This process's rank among ``world`` processes of one fold (``local``: its device index
    on this machine). ``order``: the training items of its latest epoch."""

    rank: int = 0
    world: int = 1
    local: int = 0
    order: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def from_env(cls) -> Ranks:
        """From the variables torchrun sets."""
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))

    @property
    def main(self) -> bool:
        """Rank 0: the one that saves checkpoints and the fold's result."""
        return self.rank == 0

    def join(self, kind: str) -> torch.device:
        """Joins the fold's process group (nccl on CUDA, gloo on a CPU); returns this rank's
        device: ``cuda:<local rank>`` or the CPU."""
        device = torch.device("cuda", self.local) if kind == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            BACKENDS[device.type], rank=self.rank, world_size=self.world, timeout=TIMEOUT
        )
        return device

    def wrap(self, model: torch.nn.Module, device: torch.device, find_unused: bool = False):
        """What runs the training batches: ``model`` itself, or its DDP wrapper (which averages
        the gradients over the ranks); ``model`` stays the plain module that is saved.
        ``find_unused``: some parameters get no gradient in some epochs (a frozen backbone)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)

    def split(self, data: FoldData, batch: int, seed: int):
        """(data, sampler, batch) of this rank: a DistributedSampler over every training row,
        this rank's contiguous part of the validation rows, and ``batch / world`` images a
        batch, so that the ranks' batches together are the recipe's batch."""
        if self.world == 1:
            return data, None, batch
        n = len(data.train_paths)
        sampler = DistributedSampler(range(n), self.world, self.rank, shuffle=True, seed=seed)
        part = self._part(len(data.val_paths))
        val = dataclasses.replace(
            data, val_paths=list(data.val_paths)[part], val_labels=list(data.val_labels)[part]
        )
        return val, sampler, batch // self.world

    def _part(self, n: int) -> slice:
        size = -(-n // self.world)
        return slice(min(n, self.rank * size), min(n, (self.rank + 1) * size))

    def begin_epoch(self, loader, seed: int, epoch: int) -> None:
        """Sets the sampler's epoch (every rank shuffles alike, then takes its stride) and seeds
        this rank's global generators from (seed, rank, epoch): ranks augment differently, and
        a resumed fold draws what an uninterrupted one would."""
        if self.world == 1:
            return
        loader.sampler.set_epoch(epoch)
        self.order = list(loader.sampler)
        seed_everything(hash((seed, self.rank, epoch)) % 2**31)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's last forward
        moved its own, and validation and the checkpoint need one model."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def evaluate(self, trainer) -> tuple[dict, np.ndarray]:
        """``steps.evaluate`` of a ``trainer.Trainer``'s validation pass on several ranks, over
        every validation row: each rank predicts its part through the plain model (DDP's forward may sync
        buffers, a collective), then the parts are gathered, so every rank holds the same
        probabilities and statistics."""
        t = trainer
        probs, _ = predict_proba(t.model, t.val_loader, t.device, t.opts)
        labels, classes = np.asarray(t.data.val_labels, np.int64), t.data.num_classes
        probs = self._gather(probs.reshape(-1, classes), len(labels), classes, t.device)
        return prob_stats(probs, labels), probs

    def _gather(self, part: np.ndarray, n: int, classes: int, device) -> np.ndarray:
        size = -(-n // self.world)
        buf = torch.zeros((size, classes), dtype=torch.float32, device=device)
        buf[: len(part)] = torch.from_numpy(part).to(device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        lengths = [max(0, min(size, n - r * size)) for r in range(self.world)]
        return torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)]).cpu().numpy()

    def describe(self, device: torch.device) -> list[dict]:
        """Every rank's record (rank, pid, device, training images of its latest epoch and a
        digest of which), gathered on every rank; [] for a single process."""
        if self.world == 1:
            return []
        digest = hashlib.sha256(json.dumps(sorted(self.order)).encode()).hexdigest()[:16]
        mine = {
            "rank": self.rank,
            "pid": os.getpid(),
            "device": str(device),
            "images": len(self.order),
            "items_digest": digest,
        }
        records: list = [None] * self.world
        dist.all_gather_object(records, mine)
        return records
