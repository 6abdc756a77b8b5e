"""The learning-rate range test (Smith 2015, fastai's lr_find): train a fresh model for a
few steps while the lr grows exponentially, and watch the loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from darkroom.config import TrainConfig
from darkroom.data import build_transform
from darkroom.model import create_model, mean_std
from darkroom.fit import (
    StepOptions,
    amp_dtype,
    build_criterion,
    build_optimizer,
    local_weights,
    make_loader,
    seed_everything,
    to_device,
)


def range_test(
    train_paths: Sequence[str],
    train_labels: Sequence[int],
    num_classes: int,
    cfg: TrainConfig,
    *,
    device: torch.device,
    num_workers: int = 0,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    diverge: float = 4.0,
) -> dict:
    """Runs up to ``steps`` optimizer steps with the lr going from ``start_lr`` to ``end_lr``
    geometrically; stops once the smoothed loss exceeds ``diverge`` x its minimum.

    Returns:
        ``lrs`` and smoothed ``losses`` per step, ``suggested_lr`` (steepest descent of the
        loss before its minimum) and ``min_loss_lr``.
    """
    seed_everything(cfg.seed)
    model = create_model(local_weights(cfg), num_classes).to(device)
    mean, std = mean_std(model)
    loader = make_loader(
        train_paths,
        train_labels,
        build_transform(cfg.image_size, mean, std, cfg.augment),
        cfg.batch_size,
        shuffle=True,
        num_workers=num_workers,
        seed=cfg.seed,
        drop_last=len(train_paths) > cfg.batch_size,
    )
    optimizer = build_optimizer(
        cfg.model_copy(update={"lr": start_lr, "lr_min": 0.0}), model.parameters()
    )
    criterion = build_criterion(cfg, train_labels, num_classes, device)
    opts = StepOptions(amp=amp_dtype(cfg, device))
    gamma = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    batches = _cycle(loader)
    for step in range(steps):
        lr = start_lr * gamma**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = to_device(*next(batches), device, opts)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=opts.amp, enabled=opts.amp is not None):
            loss = criterion(model(images), labels)
        if not torch.isfinite(loss):
            break
        loss.backward()
        optimizer.step()
        avg = smoothing * avg + (1 - smoothing) * loss.item()
        smoothed = avg / (1 - smoothing ** (step + 1))  # bias correction of the running mean
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best:
            break
    return {"lrs": lrs, "losses": losses, **suggest(lrs, losses)}


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> dict:
    """The lr where the loss falls fastest (per decade of lr) before its minimum, and the lr at
    the minimum. None when the test was too short to say."""
    if len(losses) < 3:
        return {"suggested_lr": None, "min_loss_lr": None}
    lo = int(np.argmin(losses))
    min_lr = float(lrs[lo])
    if lo < 2:
        return {"suggested_lr": min_lr / 10, "min_loss_lr": min_lr}
    slope = np.gradient(np.asarray(losses[: lo + 1]), np.log10(np.asarray(lrs[: lo + 1])))
    return {"suggested_lr": float(lrs[int(np.argmin(slope))]), "min_loss_lr": min_lr}


def _cycle(loader):
    while True:
        yield from loader
