"""Loaders and passes over them: the training steps of one epoch (MixUp/CutMix, gradient
accumulation, mixed precision) and predictions with the loss, accuracy and macro F1 that
validation reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

from darkroom.config import TrainConfig
from darkroom.data.images import (
    ImageDataset,
    normalise_uint8,
    uint8_affine,
    worker_context,
)
from darkroom.ops import stopping
from darkroom.training.feed import FoldLoader, resolve_workers, shutdown_workers, worker_init
from darkroom.training.records import LoaderLimits

MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0
CHECK_EVERY = 32  # training batches between looks at the loss (each look waits for the GPU)


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN/inf loss); the fold's weights must never be used."""


@dataclass
class StepOptions:
    """How a batch runs: precision, layout, accumulation, mixing."""

    amp: torch.dtype | None = None
    channels_last: bool = False
    accum: int = 1
    cfg: TrainConfig | None = None  # for MixUp/CutMix; None: no mixing
    # uint8 batches (the decode-once cache) are normalised with these on the device
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    _affine: dict = field(default_factory=dict, repr=False)  # device -> (shift, scale)


def make_loader(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    transform,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int | str = 0,
    seed: int = 0,
    drop_last: bool = False,
    limits: LoaderLimits | None = None,
    sampler=None,
) -> DataLoader:
    """A loader over the image files whose shuffle order depends on ``seed`` only.
    ``num_workers``: a count or "auto" (``resolve_workers``); ``sampler`` (a rank's
    DistributedSampler) replaces the shuffle."""
    limits, num_workers = limits or LoaderLimits(), resolve_workers(num_workers)
    return DataLoader(
        ImageDataset(paths, labels, transform, max_pixels=limits.max_pixels),
        # A worker that hangs (a stuck read on a network disk) fails the epoch after this
        # long; the fold's retry resumes from its last checkpoint.
        timeout=limits.worker_timeout if num_workers > 0 else 0,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init if num_workers > 0 else None,
        multiprocessing_context=worker_context(num_workers),
    )


def stop_workers(loader: DataLoader | FoldLoader) -> None:
    """Shuts a loader's persistent workers down, which would otherwise live until garbage
    collection, holding memory and open files after the fold is done. A fold's loader over
    the decode-once cache gives its shared workers back to the process's pool instead, for
    the next fold (``darkroom.training.feed``)."""
    if isinstance(loader, FoldLoader):
        loader.release()
    else:
        shutdown_workers(loader)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig):
    """MixUp or CutMix with the config's probabilities.

    Returns:
        (images, labels_a, labels_b, lam): the loss is lam * loss(labels_a)
        + (1 - lam) * loss(labels_b).
    """
    r = torch.rand(()).item()
    if r >= cfg.mixup_prob + cfg.cutmix_prob or len(labels) < 2:
        return images, labels, labels, 1.0
    # Pair each image with its mirror in the (already shuffled) batch, as timm's Mixup does.
    perm = torch.arange(len(labels) - 1, -1, -1, device=images.device)
    if r < cfg.mixup_prob:
        lam = float(torch.distributions.Beta(MIXUP_ALPHA, MIXUP_ALPHA).sample())
        return lam * images + (1 - lam) * images[perm], labels, labels[perm], lam
    lam = float(torch.distributions.Beta(CUTMIX_ALPHA, CUTMIX_ALPHA).sample())
    h, w = images.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    images = images.clone()
    images[..., y1:y2, x1:x2] = images[perm][..., y1:y2, x1:x2]
    lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)  # the area actually pasted
    return images, labels, labels[perm], lam


def to_device(images, labels, device, opts: StepOptions):
    """The batch on ``device``, images in the layout ``opts`` asks for; a uint8 batch (the
    decode-once cache's NHWC pixels) is normalised there, so a GPU does that work."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalise(images, opts)
    if opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    else:
        images = images.contiguous()
    return images, labels.to(device, non_blocking=True)


def normalise(images: torch.Tensor, opts: StepOptions) -> torch.Tensor:
    """NHWC uint8 pixels as the model's input (``data.normalise_uint8``), with ``opts``'
    mean/std made into tensors once per device: a copy per batch would wait for the GPU."""
    if opts.mean is None or opts.std is None:
        raise ValueError("a uint8 batch needs StepOptions.mean and .std to be normalised")
    affine = opts._affine.get(images.device)
    if affine is None:
        affine = opts._affine[images.device] = uint8_affine(opts.mean, opts.std, images.device)
    return normalise_uint8(images, affine)


def _forward(model, images, labels, criterion, opts: StepOptions):
    """Logits and loss of one batch already on the device, mixed (MixUp/CutMix) when
    ``opts.cfg`` asks for it."""
    y_a, y_b, lam = labels, labels, 1.0
    if opts.cfg is not None:
        images, y_a, y_b, lam = mix_batch(images, labels, opts.cfg)
    with torch.autocast(images.device.type, dtype=opts.amp, enabled=opts.amp is not None):
        logits = model(images)
        loss = criterion(logits, y_a)
        if lam != 1.0:
            loss = lam * loss + (1 - lam) * criterion(logits, y_b)
    return logits, loss


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    criterion,
    device,
    opts: StepOptions | None = None,
    scaler=None,
) -> dict:
    """One pass over ``loader``; an optimizer (and scheduler) step every ``opts.accum`` batches.

    Returns:
        The mean loss, accuracy and macro F1 over the epoch's batches (the loss as trained,
        mixed and smoothed; the accuracy against the unmixed labels).

    Raises:
        NonFiniteLoss: a batch's loss is NaN or infinite (found within CHECK_EVERY batches).
    """
    opts = opts or StepOptions()
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    # Sums, predictions and the finiteness check stay on the device: a .item() per batch would
    # make the host wait for the GPU before it can queue the next batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    preds, targets = [], []
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(loader):
        stopping.check()
        targets.append(labels)
        images, labels = to_device(images, labels, device, opts)
        logits, loss = _forward(model, images, labels, criterion, opts)
        finite &= torch.isfinite(loss.detach())
        if (i + 1) % CHECK_EVERY == 0:
            _check_finite(finite, scheduler)
        scaler.scale(loss / opts.accum).backward()
        if (i + 1) % opts.accum == 0 or i + 1 == len(loader):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        loss_sum += loss.detach().double() * labels.numel()
        preds.append(logits.detach().argmax(1))
    _check_finite(finite, scheduler)
    return _epoch_stats(loss_sum.item(), [torch.cat(preds).cpu()] if preds else [], targets)


def _check_finite(finite: torch.Tensor, scheduler) -> None:
    if not finite.item():
        raise NonFiniteLoss(
            f"loss became NaN or infinite at lr {scheduler.get_last_lr()[0]:.2e}:"
            " lower the lr or check the data"
        )


@torch.no_grad()
def predict_proba(
    model, loader, device, opts: StepOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and the loader's labels, in loader order."""
    opts = opts or StepOptions()
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        stopping.check()
        images, _ = to_device(images, y, device, opts)
        with torch.autocast(device.type, dtype=opts.amp, enabled=opts.amp is not None):
            logits = model(images)
        probs.append(torch.softmax(logits.float(), 1))  # to the host once, at the end
        labels.append(y)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(probs).cpu().numpy(), torch.cat(labels).numpy()


def evaluate(
    model, loader, criterion, device, opts: StepOptions | None = None
) -> tuple[dict, np.ndarray]:
    """Unweighted, unsmoothed cross-entropy (the validation loss early stopping watches),
    accuracy and macro F1, and the softmax probabilities.

    ``criterion`` is not used: the loss must not depend on the training loss's options.
    """
    probs, labels = predict_proba(model, loader, device, opts)
    return prob_stats(probs, labels), probs


def prob_stats(probs: np.ndarray, labels: np.ndarray) -> dict:
    """``evaluate``'s numbers from probabilities and labels (a fold on several processes
    gathers its ranks' probabilities first)."""
    logp = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    loss = torch.nn.functional.nll_loss(logp, torch.from_numpy(labels), reduction="sum").item()
    pred = torch.from_numpy(probs.argmax(1))
    return _epoch_stats(loss, [pred], [torch.from_numpy(labels)])


def _epoch_stats(loss_sum: float, preds: list, targets: list) -> dict:
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    total = max(len(y_true), 1)
    return {
        "loss": loss_sum / total,
        "accuracy": int((y_pred == y_true).sum()) / total,
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
