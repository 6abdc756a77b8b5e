"""Images to tensors: OpenCV decode, BGR to RGB, albumentations transforms."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset


class UnreadableImage(ValueError):
    pass


def read_rgb(path: str) -> np.ndarray:
    """Decodes any supported image file to an HxWx3 uint8 RGB array."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # also expands grey and drops alpha
    if img is None:
        raise UnreadableImage(f"OpenCV could not decode {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_rgb(data: bytes) -> np.ndarray:
    """``read_rgb`` for bytes already in memory (an object read from storage)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise UnreadableImage("OpenCV could not decode the image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def build_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: str = "none"
) -> A.Compose:
    """Resize (+ augmentation for training), normalise with the backbone's mean/std, to tensor.

    Args:
        augment: "soft" (the tutorials' rotate/flip/one hole), "no-flip" (the same without
            mirroring, for text and digits) or "none" (evaluation).
    """
    ops: list = [A.Resize(image_size, image_size)]
    if augment in ("soft", "no-flip"):
        ops.append(A.Rotate(limit=45, p=0.6))
        if augment == "soft":
            ops.append(A.HorizontalFlip(p=0.6))
        hole = max(1, round(64 * image_size / 224))  # one 64 px hole at 224 px, scaled
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(hole, hole),
                hole_width_range=(hole, hole),
                p=0.3,
            )
        )
    elif augment != "none":
        raise ValueError(f"unknown augment {augment!r}: use soft, no-flip or none")
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


class ImageDataset(Dataset):
    """Files and integer labels (-1 when unlabeled) through a transform."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, transform):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.transform(image=read_rgb(self.paths[i]))["image"]
        return image, torch.tensor(self.labels[i], dtype=torch.long)


class SafeImageDataset(ImageDataset):
    """For scoring: an unreadable file yields a zero image and ok=False instead of raising."""

    def __init__(self, paths, transform, image_size: int):
        super().__init__(paths, None, transform)
        self.blank = torch.zeros(3, image_size, image_size)

    def __getitem__(self, i: int):
        try:
            return super().__getitem__(i)[0], i, True
        except UnreadableImage:
            return self.blank, i, False


def worker_context(num_workers: int) -> str | None:
    """DataLoader workers start from a clean forkserver, not a fork of this process: a Prefect
    worker is multithreaded (engine, log and event threads), and forking it is unsafe."""
    return "forkserver" if num_workers > 0 else None
