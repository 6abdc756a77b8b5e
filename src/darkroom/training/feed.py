"""Feeding the training step from the decode-once cache (``darkroom.data.cache``): uint8 pixels
already at the training size, augmented in loader workers, normalised on the device.

The workers outlive a fold: a process keeps one pool of loaders, each item of a batch names its
entry, label and augmentation, so any fold's train or validation pass runs on the same
workers. Folds that train one after another in a process (and the OOM retry of a fold) start
the workers once; folds that train at once (one per GPU) each take a loader of their own.
"""

from __future__ import annotations

import atexit
import functools
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from darkroom.data.cache import load_entry
from darkroom.data.images import augmentation, worker_context
from darkroom.ops.cores import usable_cores

if TYPE_CHECKING:
    from darkroom.training.records import FoldData

PREFETCH_BATCHES = 4  # per worker: enough to ride out a slow batch


def resolve_workers(num_workers: int | str) -> int:
    """A worker count: ``"auto"`` is one per core this process may use, less one for the
    main process (which runs the training step and, on a CPU, its threads); none on a machine
    of two cores or fewer, where a worker only takes the step's second core."""
    if num_workers != "auto":
        return int(num_workers)
    cores = usable_cores()
    return cores - 1 if cores > 2 else 0


def worker_init(_worker_id: int) -> None:
    """Loader workers are many: each stays on one thread (OpenCV's and torch's pools would
    otherwise start a thread per core in every worker and fight over the cores)."""
    cv2.setNumThreads(0)
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=16)
def _augmentation(augment: str, side: int):
    return augmentation(side, augment)


class DecodedImages(Dataset):
    """Items are ``(entry path, label, augment)``: the batch sampler says which; the dataset
    itself holds nothing, so one set of workers serves every fold."""

    def __getitem__(self, item: tuple[str, int, str]) -> tuple[np.ndarray, int]:
        path, label, augment = item
        pixels = load_entry(path)
        if augment != "none":
            pixels = _augmentation(augment, pixels.shape[0])(image=pixels)["image"]
        return np.ascontiguousarray(pixels), label  # collated to an NHWC uint8 batch

    def __len__(self) -> int:
        return 0  # never sampled by index


class _Batches:
    """A batch sampler whose batches are set before each pass."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shutdown_workers(loader: DataLoader) -> None:
    """Stops a loader's persistent worker processes, if it has any running."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


class _Pool:
    """Idle shared loaders by (workers, timeout); their workers are stopped at exit."""

    def __init__(self):
        self.idle: dict[tuple, list[DataLoader]] = {}
        self.lock = threading.Lock()

    def take(self, key: tuple) -> DataLoader:
        with self.lock:
            if self.idle.get(key):
                return self.idle[key].pop()
        workers, timeout = key
        return DataLoader(
            DecodedImages(),
            batch_sampler=_Batches(),
            num_workers=workers,
            # A worker that hangs fails the epoch after this long; the fold's retry resumes.
            timeout=timeout if workers else 0,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH_BATCHES if workers else None,
            worker_init_fn=worker_init if workers else None,
            multiprocessing_context=worker_context(workers),
        )

    def give(self, key: tuple, loader: DataLoader) -> None:
        with self.lock:
            self.idle.setdefault(key, []).append(loader)

    def close(self) -> None:
        with self.lock:
            loaders = [loader for group in self.idle.values() for loader in group]
            self.idle.clear()
        for loader in loaders:
            shutdown_workers(loader)


_POOL = _Pool()
atexit.register(_POOL.close)


def close_loaders() -> None:
    """Stops the workers of every idle shared loader of this process (the next fit starts
    new ones)."""
    _POOL.close()


class LoaderLease:
    """One shared loader, held by one fold at a time; given back to the pool for the next."""

    def __init__(self, num_workers: int, timeout: float):
        self.key = (num_workers, timeout)
        self.loader: DataLoader | None = _POOL.take(self.key)
        self.broken = False

    def run(self, batches: list[list]):
        """The collated batches of ``batches``, in order."""
        if self.loader is None:
            raise RuntimeError("this fold's loader was already given back")
        self.loader.batch_sampler.batches = batches
        threads = cv2.getNumThreads()
        if not self.key[0]:  # augmenting in this process, between training steps
            # OpenCV's pool busy-waits after each call, on the cores the step's threads need:
            # measured on 2 cores, the step after a batch ran 5 to 9 times slower.
            cv2.setNumThreads(0)
        try:
            # A pass left unfinished is fine: the next one first drains what workers prefetched.
            yield from self.loader
        except Exception:
            self.broken = True  # a dead or stuck worker: never hand this loader on
            raise
        finally:
            cv2.setNumThreads(threads)

    def release(self) -> None:
        """Gives the loader back to the pool (stops its workers if it failed); idempotent."""
        loader, self.loader = self.loader, None
        if loader is None:
            return
        if self.broken:
            shutdown_workers(loader)
        else:
            _POOL.give(self.key, loader)


class FoldLoader:
    """One fold's train or validation pass over cache entries, through a shared loader.

    The order of a shuffled pass depends on ``generator`` alone (the fit seeds it with seed +
    epoch), drawn as DataLoader's single-process iterator draws it, so the cache changes no
    batch's composition; the number of workers changes nothing either.
    """

    def __init__(
        self,
        lease: LoaderLease,
        entries: Sequence[str],
        labels: Sequence[int],
        augment: str,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        sampler=None,
    ):
        self.lease = lease
        self.dataset = [(e, int(y), augment) for e, y in zip(entries, labels, strict=True)]
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = sampler  # a rank's DistributedSampler: its items, in its order

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        b = self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def order(self) -> list[int]:
        """The item order of the next pass."""
        n = len(self.dataset)
        if self.sampler is not None:
            return list(self.sampler)
        if not self.shuffle:
            return list(range(n))
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the base seed
        return torch.randperm(n, generator=self.generator).tolist()

    def __iter__(self):
        items = [self.dataset[i] for i in self.order()]
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        return self.lease.run(batches[: len(self)])

    def release(self) -> None:
        """Gives the shared loader back (see LoaderLease.release)."""
        self.lease.release()


def fold_loaders(
    data: FoldData, augment: str, batch: int, num_workers: int | str, seed: int, sampler=None
) -> tuple[FoldLoader, FoldLoader]:
    """The shuffled, augmented train pass (``sampler``'s items when given) and the validation
    pass in row order of a fold whose paths are cache entries; both run on one shared loader."""
    lease = LoaderLease(resolve_workers(num_workers), data.limits.worker_timeout)
    n = len(sampler) if sampler is not None else len(data.train_paths)
    drop = n % batch == 1  # a batch of one breaks BatchNorm
    train = FoldLoader(
        lease,
        data.train_paths,
        data.train_labels,
        augment,
        batch,
        shuffle=True,
        seed=seed,
        drop_last=drop,
        sampler=sampler,
    )
    val = FoldLoader(lease, data.val_paths, data.val_labels, "none", batch, shuffle=False)
    return train, val
