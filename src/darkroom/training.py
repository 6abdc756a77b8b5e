"""Fine-tuning one fold: the tutorials' recipe (Adam, per-batch cosine to lr_min, cross-entropy),
keeping the weights of the epoch with the lowest validation loss."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

from darkroom.config import TrainConfig
from darkroom.data import ImageDataset, build_transform
from darkroom.model import create_model, mean_std

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN/inf loss); the fold's weights must never be used."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def make_loader(paths: Sequence[str], labels: Sequence[int] | None, transform, batch_size: int,
                *, shuffle: bool, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(paths, labels, transform), batch_size=batch_size,
                      shuffle=shuffle, num_workers=num_workers, generator=generator,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=num_workers > 0)


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device) -> dict:
    """One pass over ``loader``; the scheduler steps per batch."""
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    preds, targets = [], []
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = criterion(logits, labels)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at lr {scheduler.get_last_lr()[0]:.2e}:"
                                " lower the lr or check the data")
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = labels.numel()
        total += n
        loss_sum += loss.item() * n
        pred = logits.argmax(1)
        correct += (pred == labels).sum().item()
        preds.append(pred.cpu())
        targets.append(labels.cpu())
    return _epoch_stats(loss_sum, correct, total, preds, targets)


@torch.no_grad()
def predict_proba(model, loader, device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and the loader's labels, in loader order."""
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        logits = model(images.to(device, non_blocking=True))
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(y)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate(model, loader, criterion, device) -> tuple[dict, np.ndarray]:
    probs, labels = predict_proba(model, loader, device)
    logp = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    loss = torch.nn.functional.nll_loss(logp, torch.from_numpy(labels), reduction="sum").item()
    pred = probs.argmax(1)
    stats = _epoch_stats(loss, int((pred == labels).sum()), len(labels),
                         [torch.from_numpy(pred)], [torch.from_numpy(labels)])
    return stats, probs


def _epoch_stats(loss_sum, correct, total, preds, targets) -> dict:
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1),
            "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


@dataclass
class FoldResult:
    model: torch.nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    val_probs: np.ndarray | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


def fit(
    train_paths: Sequence[str], train_labels: Sequence[int],
    val_paths: Sequence[str], val_labels: Sequence[int],
    num_classes: int, cfg: TrainConfig, *, device: torch.device, num_workers: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> FoldResult:
    """Trains a fresh model on the train rows, validating each epoch; keeps the best epoch.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite.
    """
    seed_everything(cfg.seed)
    model = create_model(cfg, num_classes).to(device)
    mean, std = mean_std(model)
    train_tf = build_transform(cfg.image_size, mean, std, cfg.augment)
    eval_tf = build_transform(cfg.image_size, mean, std, "none")
    # A last batch of one breaks BatchNorm in train mode; drop it when it would happen.
    drop_last = len(train_paths) % cfg.batch_size == 1
    train_loader = make_loader(train_paths, train_labels, train_tf, cfg.batch_size, shuffle=True,
                               num_workers=num_workers, seed=cfg.seed, drop_last=drop_last)
    val_loader = make_loader(val_paths, val_labels, eval_tf, cfg.batch_size, shuffle=False,
                             num_workers=num_workers)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps,
                                                           eta_min=cfg.lr_min)
    criterion = torch.nn.CrossEntropyLoss()
    best_loss, best_state, best_epoch, best_probs = math.inf, None, -1, None
    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        tr = train_one_epoch(model, train_loader, optimizer, scheduler, criterion, device)
        va, probs = evaluate(model, val_loader, criterion, device)
        row = {"epoch": epoch, "lr": scheduler.get_last_lr()[0],
               "seconds": time.perf_counter() - t0,
               **{f"train_{k}": v for k, v in tr.items()},
               **{f"val_{k}": v for k, v in va.items()}}
        history.append(row)
        if va["loss"] < best_loss:
            best_loss, best_epoch, best_probs = va["loss"], epoch, probs
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(row)
    model.load_state_dict(best_state)
    return FoldResult(model=model, best_epoch=best_epoch, history=history, val_probs=best_probs,
                      mean=mean, std=std)
