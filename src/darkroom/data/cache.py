"""The decode-once cache: each labeled image decoded and resized once, kept as uint8 pixels that
every fold, every epoch and later retrains read instead of decoding the file again.

Layout, beside the sync cache (``<cache>/decoded/``)::

    v<DECODE_VERSION>/<side>/<image_id[:2]>/<image_id>.npy    side x side x 3 uint8 RGB

An entry is keyed by the image's content hash (the index's ``image_id``), the side and the
decode rule version, so changed content, another ``image_size`` or a new decode rule each get
entries of their own and never read stale pixels. ``.npy`` files can be memory-mapped
(``np.load(mmap_mode="r")``) and are written atomically (a temporary file, then a rename), so
several processes may build the same entries at once. The total size is bounded: after a
build, the least recently used entries go until the cache fits, never those the build needs.

The side is the training ``image_size`` itself, not a margin above it: the recipe's first step
squashes the image to ``image_size x image_size`` (``build_transform``'s Resize) and augments
after that, so the cached Resize output gives the very tensors the file path gives, where a
larger cache re-resized would change pixels and cost a second resize per image per epoch.
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from darkroom.data.images import DEFAULT_MAX_IMAGE_PIXELS, read_rgb
from darkroom.data.progress import Progress
from darkroom.ops.cores import usable_cores

log = logging.getLogger(__name__)

# Bump when decode_rgb or the resize below changes pixels: old entries are then never read.
DECODE_VERSION = 1
_STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a killed build


def resize_square(rgb: np.ndarray, side: int) -> np.ndarray:
    """``rgb`` squashed to ``side x side`` exactly as ``build_transform``'s leading
    ``A.Resize(side, side)`` does it (bilinear OpenCV; unchanged when already that size)."""
    if rgb.shape[:2] == (side, side):
        return rgb
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)


def load_entry(path: str) -> np.ndarray:
    """An entry's pixels (a writable copy: augmentations may work in place)."""
    return np.load(path)


@dataclass(frozen=True)
class BuildReport:
    """What one ``DecodedCache.build`` did."""

    entries: list[str]  # one per requested image, in request order
    decoded: int  # images decoded now (the rest were cached already)
    seconds: float


class DecodedCache:
    """Decoded ``side x side`` uint8 RGB pixels of images, by content hash, under ``root``.

    Args:
        root: the cache folder (``<sync cache>/decoded``); created on demand.
        side: the training ``image_size``.
        max_bytes: the most bytes all entries under ``root`` (every side and version) may take
            after a build; entries the build needs stay even when they alone exceed it.
    """

    def __init__(self, root: str | Path, side: int, max_bytes: int):
        self.root, self.side, self.max_bytes = Path(root), side, max_bytes
        self.entry_bytes = _npy_header_bytes((side, side, 3)) + side * side * 3

    def entry(self, image_id: str) -> Path:
        """Where ``image_id``'s pixels at this side live (whether or not they do yet)."""
        if not image_id or not image_id.isalnum():
            raise ValueError(f"image_id {image_id!r} is not a content hash")
        folder = self.root / f"v{DECODE_VERSION}" / str(self.side) / image_id[:2]
        return folder / f"{image_id}.npy"

    def has(self, image_id: str) -> bool:
        """Whether a complete entry of ``image_id`` is there (checked by its exact size)."""
        try:
            return self.entry(image_id).stat().st_size == self.entry_bytes
        except FileNotFoundError:
            return False

    def build(
        self,
        image_ids: Sequence[str],
        paths: Sequence[str],
        *,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        threads: int | None = None,
        progress: Progress = None,
    ) -> BuildReport:
        """Entries for ``image_ids`` (``paths``: their local files), decoding the missing
        ones on ``threads`` threads (OpenCV decodes without the GIL; default: every core).
        Entries found are marked used now (their modification time), which is what pruning
        goes by. Then ``prune`` keeps the cache within ``max_bytes``.

        Raises:
            UnreadableImage: an image cannot be decoded (ImageTooLarge: more than
                ``max_pixels``). Nothing is cached for it; the entries decoded before stay.
        """
        t0, ids = time.perf_counter(), list(image_ids)
        todo = [i for i, image_id in enumerate(ids) if not self._touch(image_id)]
        if todo:
            log.info("decoding %d of %d images into %s", len(todo), len(ids), self.root)
        pool = ThreadPoolExecutor(max(1, threads or usable_cores()))
        try:
            jobs = [pool.submit(self._decode, ids[i], paths[i], max_pixels) for i in todo]
            for done, job in enumerate(jobs, 1):
                job.result()
                if progress:
                    progress(done, len(todo))
        finally:  # on a refused image, the images not started yet are not decoded
            pool.shutdown(cancel_futures=True)
        entries = [str(self.entry(i)) for i in ids]
        self.prune(keep=entries)
        return BuildReport(entries, len(todo), time.perf_counter() - t0)

    def _touch(self, image_id: str) -> bool:
        """Marks a complete entry used now; False when there is none."""
        if not self.has(image_id):
            return False
        try:
            os.utime(self.entry(image_id))
        except FileNotFoundError:  # pruned by another process between the two calls
            return False
        return True

    def _decode(self, image_id: str, path: str, max_pixels: int) -> None:
        rgb = read_rgb(path, max_pixels=max_pixels, min_side=self.side)
        pixels = np.ascontiguousarray(resize_square(rgb, self.side))
        dest = self.entry(image_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.stem}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, pixels, allow_pickle=False)
            os.replace(tmp, dest)  # atomic: a reader sees the whole entry or none
        finally:
            tmp.unlink(missing_ok=True)

    def prune(self, keep: Sequence[str] = ()) -> int:
        """Deletes the least recently used entries (and temporary files left by killed
        builds) until the cache fits in ``max_bytes``; never an entry in ``keep``.

        Returns:
            The bytes freed.
        """
        keep_set, now = set(keep), time.time()
        entries, total, freed = [], 0, 0
        for path in self.root.glob("v*/*/*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:  # another process pruned or renamed it meanwhile
                continue
            if path.suffix == ".tmp":
                if now - st.st_mtime > _STALE_TEMP_SECONDS:
                    path.unlink(missing_ok=True)
                continue
            entries.append((st.st_mtime, str(path), st.st_size))
            total += st.st_size
        for _, path, size in sorted(entries):
            if total - freed <= self.max_bytes:
                break
            if path not in keep_set:
                Path(path).unlink(missing_ok=True)
                freed += size
        if freed:
            log.info("decoded cache over %d bytes: freed %d bytes", self.max_bytes, freed)
        return freed


def _npy_header_bytes(shape: tuple[int, ...]) -> int:
    """The size of the header ``np.save`` writes before uint8 pixels of ``shape``."""
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return len(buf.getvalue())  # the magic string included


def log_progress(what: str, every: float = 10.0) -> Progress:
    """A ``progress(done, total)`` that logs ``what`` at most every ``every`` seconds and at
    the end: a long build says how far it got."""
    last = [time.monotonic()]

    def report(done: int, total: int) -> None:
        if done == total or time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            log.info("%s: %d of %d", what, done, total)

    return report
