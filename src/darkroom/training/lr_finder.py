"""The learning-rate range test (Smith 2015, fastai's lr_find): train a fresh model for a
few steps while the lr grows exponentially, and watch the loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from darkroom import layout
from darkroom.config import RetrainConfig, TrainConfig
from darkroom.data.images import build_transform
from darkroom.model.backbone import create_model, mean_std
from darkroom.storage import Storage
from darkroom.training import plots
from darkroom.training.recipe import amp_dtype, build_criterion, build_optimizer, local_weights
from darkroom.training.rng import seed_everything
from darkroom.training.steps import StepOptions, make_loader, to_device

START_LR, END_LR = 1e-7, 10.0
SMOOTHING = 0.98  # of the running mean of the loss
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum
WARMUP = 10  # steps of the running mean that the suggestion ignores (see suggest)


def _setup(paths, labels, num_classes: int, cfg: TrainConfig, device, num_workers: int):
    """A fresh model, its optimizer (lr set per step), criterion, loader and step options."""
    seed_everything(cfg.seed)
    model = create_model(local_weights(cfg), num_classes).to(device)
    mean, std = mean_std(model)
    loader = make_loader(
        paths,
        labels,
        build_transform(cfg.image_size, mean, std, cfg.augment),
        cfg.batch_size,
        shuffle=True,
        num_workers=num_workers,
        seed=cfg.seed,
        drop_last=len(paths) > cfg.batch_size,
    )
    optimizer = build_optimizer(cfg, model.parameters())
    criterion = build_criterion(cfg, labels, num_classes, device)
    return model, optimizer, criterion, loader, StepOptions(amp=amp_dtype(cfg, device))


def range_test(
    paths: Sequence[str],
    labels: Sequence[int],
    num_classes: int,
    cfg: TrainConfig,
    *,
    device: torch.device,
    num_workers: int = 0,
    steps: int = 100,
) -> dict:
    """Runs up to ``steps`` optimizer steps with the lr going from START_LR to END_LR
    geometrically; stops once the smoothed loss exceeds DIVERGE x its minimum.

    Returns:
        ``lrs`` and smoothed ``losses`` per step, ``suggested_lr`` (steepest descent of the
        loss before its minimum) and ``min_loss_lr``.
    """
    model, optimizer, criterion, loader, opts = _setup(
        paths, labels, num_classes, cfg, device, num_workers
    )
    gamma = (END_LR / START_LR) ** (1 / max(steps - 1, 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    model.train()
    batches = _cycle(loader)
    for step in range(steps):
        lr = START_LR * gamma**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = to_device(*next(batches), device, opts)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=opts.amp, enabled=opts.amp is not None):
            loss = criterion(model(images), targets)
        if not torch.isfinite(loss):
            break
        loss.backward()
        optimizer.step()
        avg = SMOOTHING * avg + (1 - SMOOTHING) * loss.item()
        lrs.append(lr)
        losses.append(avg / (1 - SMOOTHING ** (step + 1)))  # bias-corrected running mean
        best = min(best, losses[-1])
        if losses[-1] > DIVERGE * best:
            break
    return {"lrs": lrs, "losses": losses, **suggest(lrs, losses)}


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> dict:
    """The lr where the loss falls fastest (per decade of lr) before its minimum, and the lr at
    the minimum. None when the test was too short to say.

    The first WARMUP steps are left out of the search when the descent is long enough: the
    running mean is still settling there, and its small early wiggles, over a tiny span of lr,
    look like the steepest descent of all (a 100-step test once chose its own first lr).
    """
    if len(losses) < 3:
        return {"suggested_lr": None, "min_loss_lr": None}
    lo = int(np.argmin(losses))
    min_lr = float(lrs[lo])
    if lo < 2:
        return {"suggested_lr": min_lr / 10, "min_loss_lr": min_lr}
    start = WARMUP if lo - WARMUP >= 2 else 0
    span = slice(start, lo + 1)
    slope = np.gradient(np.asarray(losses[span]), np.log10(np.asarray(lrs[span])))
    return {"suggested_lr": float(lrs[start + int(np.argmin(slope))]), "min_loss_lr": min_lr}


def _cycle(loader):
    while True:
        yield from loader


def find_lr(
    storage: Storage, config: RetrainConfig, steps: int = 100, snapshot: str | None = None
) -> dict:
    """The lr range test on the train rows of ``snapshot`` (default: the current index).
    Writes ``reports/lr_finder/<snapshot>-<config>.png`` and ``.json``; returns the result
    with their URLs."""
    from darkroom.data.fetch import local_paths
    from darkroom.data.index import read_index
    from darkroom.model.backbone import resolve_device
    from darkroom.training.fit import release_memory

    df, classes, snapshot = read_index(storage, snapshot)
    rows, cfg = df[df["split"] == "train"], config.train
    paths = local_paths(storage, rows, config.cache_path(storage.uri))
    device = resolve_device(config.device)
    try:
        result = range_test(
            paths,
            rows["class_index"].tolist(),
            len(classes),
            cfg,
            device=device,
            num_workers=config.num_workers,
            steps=steps,
        )
    finally:
        release_memory()
    key = lambda ext: layout.lr_finder(snapshot, cfg.fingerprint(), ext)  # noqa: E731
    png = plots.lr_finder_png(result["lrs"], result["losses"], result["suggested_lr"])
    storage.write_bytes(key("png"), png)
    out = {
        **result,
        "snapshot": snapshot,
        "train_config": cfg.model_dump(mode="json"),
        "plot": storage.url(key("png")),
        "json": storage.url(key("json")),
    }
    storage.write_json(key("json"), out)
    return out
