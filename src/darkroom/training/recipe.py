"""The pieces of the training recipe, chosen by the config: optimizer, loss, mixed precision,
pretrained weights, and the frozen-backbone warm-up."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from darkroom.config import TrainConfig

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
}
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype on CUDA (None: full precision, always so on a CPU)."""
    mode = cfg.mixed_precision
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return AMP_DTYPES[mode]


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The config's optimizer at the config's starting lr and weight decay."""
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """n / (n_classes * count) per class: each class weighs the same in the loss in total.
    A class without training rows gets 0 (it never occurs as a target anyway)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def build_criterion(cfg: TrainConfig, labels: Sequence[int], num_classes: int, device):
    """Cross-entropy with the config's label smoothing and class weights (``labels``: the
    training rows' classes, which the balanced weights are computed from)."""
    balanced = cfg.class_weights == "balanced"
    weight = class_weights(labels, num_classes).to(device) if balanced else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def set_backbone_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """Freezes (or unfreezes) every parameter but the classifier head's."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad_(trainable or id(p) in head)


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Puts every BatchNorm layer in eval mode: a frozen backbone must not drift through its
    running statistics either. Call it after ``model.train()``, which undoes it."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def local_weights(cfg: TrainConfig) -> TrainConfig:
    """The config with ``pretrained_file`` as a local path: a storage URI (s3://..., file://...)
    is downloaded once into the cache ($DARKROOM_CACHE or ~/.cache/darkroom)."""
    uri = cfg.pretrained_file
    if not (cfg.pretrained and uri and "://" in uri):
        return cfg
    from darkroom.storage import atomic_write_file, open_storage

    root, _, name = uri.rstrip("/").rpartition("/")
    base = Path(os.environ.get("DARKROOM_CACHE", Path.home() / ".cache" / "darkroom"))
    dest = base / "weights" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{name}"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(dest, open_storage(root).read_bytes(name))
    return cfg.model_copy(update={"pretrained_file": str(dest)})
