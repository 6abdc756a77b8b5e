"""Fine-tuning one fold: the tutorials' recipe (Adam, per-step cosine to lr_min, cross-entropy)
plus what an overnight run needs: a checkpoint after every epoch to resume from, early stopping
that keeps the best epoch, a frozen-backbone warm-up, mixed precision on CUDA, and a retry with
half the batch size when CUDA runs out of memory."""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

from darkroom.config import TrainConfig
from darkroom.data import ImageDataset, build_transform, worker_context
from darkroom.model import create_model, mean_std

log = logging.getLogger(__name__)

MIXUP_ALPHA, CUTMIX_ALPHA = 0.2, 1.0


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN/inf loss); the fold's weights must never be used."""


class Checkpointer(Protocol):
    """Where a fold keeps its training state between epochs (see ``pipeline``)."""

    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """Every global RNG's state as tensors and lists, so ``torch.load(weights_only=True)``
    reads it back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def release_memory() -> None:
    """Returns cached GPU memory to the driver, so the next fold starts from an empty GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_loader(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    transform,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(paths, labels, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers),
    )


# ---- pieces of the recipe -------------------------------------------------------------------


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype on CUDA (None: full precision, always so on a CPU)."""
    if device.type != "cuda" or cfg.mixed_precision == "off":
        return None
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """n / (n_classes * count) per class: each class weighs the same in the loss in total.
    A class without training rows gets 0 (it never occurs as a target anyway)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def build_criterion(cfg: TrainConfig, labels: Sequence[int], num_classes: int, device):
    weight = (
        class_weights(labels, num_classes).to(device) if cfg.class_weights == "balanced" else None
    )
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def set_backbone_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """Freezes (or unfreezes) every parameter but the classifier head's."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad_(trainable or id(p) in head)


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    # A frozen backbone must not drift through its BatchNorm running statistics either.
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def mix_batch(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig):
    """MixUp or CutMix with the config's probabilities. Returns (images, labels_a, labels_b,
    lam): the loss is lam * loss(labels_a) + (1 - lam) * loss(labels_b)."""
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


@dataclass
class StepOptions:
    """How a batch runs: precision, layout, accumulation, mixing."""

    amp: torch.dtype | None = None
    channels_last: bool = False
    accum: int = 1
    cfg: TrainConfig | None = None  # for MixUp/CutMix; None: no mixing


def to_device(images, labels, device, opts: StepOptions):
    images = images.to(device, non_blocking=True)
    if opts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


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
    """One pass over ``loader``; an optimizer (and scheduler) step every ``opts.accum``
    batches.

    Raises:
        NonFiniteLoss: a batch's loss is NaN or infinite.
    """
    opts = opts or StepOptions()
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    total, correct, loss_sum = 0, 0, 0.0
    preds, targets = [], []
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader)
    for i, (images, labels) in enumerate(loader):
        images, labels = to_device(images, labels, device, opts)
        if opts.cfg is not None:
            images, y_a, y_b, lam = mix_batch(images, labels, opts.cfg)
        else:
            y_a, y_b, lam = labels, labels, 1.0
        with torch.autocast(device.type, dtype=opts.amp, enabled=opts.amp is not None):
            logits = model(images)
            loss = (
                criterion(logits, y_a)
                if lam == 1.0
                else lam * criterion(logits, y_a) + (1 - lam) * criterion(logits, y_b)
            )
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"loss became {loss.item()} at lr {scheduler.get_last_lr()[0]:.2e}:"
                " lower the lr or check the data"
            )
        scaler.scale(loss / opts.accum).backward()
        if (i + 1) % opts.accum == 0 or i + 1 == n_batches:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
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
def predict_proba(
    model, loader, device, opts: StepOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and the loader's labels, in loader order."""
    opts = opts or StepOptions()
    model.eval()
    probs, labels = [], []
    for images, y in loader:
        images, _ = to_device(images, y, device, opts)
        with torch.autocast(device.type, dtype=opts.amp, enabled=opts.amp is not None):
            logits = model(images)
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(y)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate(
    model, loader, criterion, device, opts: StepOptions | None = None
) -> tuple[dict, np.ndarray]:
    """Unweighted, unsmoothed cross-entropy (the validation loss early stopping watches),
    accuracy and macro F1."""
    probs, labels = predict_proba(model, loader, device, opts)
    logp = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    loss = torch.nn.functional.nll_loss(logp, torch.from_numpy(labels), reduction="sum").item()
    pred = probs.argmax(1)
    stats = _epoch_stats(
        loss,
        int((pred == labels).sum()),
        len(labels),
        [torch.from_numpy(pred)],
        [torch.from_numpy(labels)],
    )
    return stats, probs


def _epoch_stats(loss_sum, correct, total, preds, targets) -> dict:
    y_pred, y_true = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    return {
        "loss": loss_sum / max(total, 1),
        "accuracy": correct / max(total, 1),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def local_weights(cfg: TrainConfig) -> TrainConfig:
    """The config with ``pretrained_file`` as a local path: a storage URI (s3://..., file://...)
    is downloaded once into the cache ($DARKROOM_CACHE or ~/.cache/darkroom)."""
    uri = cfg.pretrained_file
    if not (cfg.pretrained and uri and "://" in uri):
        return cfg
    from darkroom.storage import open_storage

    root, _, name = uri.rstrip("/").rpartition("/")
    base = Path(os.environ.get("DARKROOM_CACHE", Path.home() / ".cache" / "darkroom"))
    dest = base / "weights" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{name}"
    if not dest.is_file():
        from darkroom.storage import atomic_write_file

        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(dest, open_storage(root).read_bytes(name))
    return cfg.model_copy(update={"pretrained_file": str(dest)})


# ---- one fold -------------------------------------------------------------------------------


@dataclass
class FoldResult:
    model: torch.nn.Module
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    val_probs: np.ndarray | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    resumed_from_epoch: int = 0  # first epoch this call trained (0: started from scratch)
    batch_size: int = 0  # after any out-of-memory halving
    grad_accum_steps: int = 1
    stopped_early: bool = False


def fit(
    train_paths: Sequence[str],
    train_labels: Sequence[int],
    val_paths: Sequence[str],
    val_labels: Sequence[int],
    num_classes: int,
    cfg: TrainConfig,
    *,
    device: torch.device,
    num_workers: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
) -> FoldResult:
    """Trains a model on the train rows, validating each epoch; keeps the best epoch.

    With ``checkpoint``, the state after every epoch is saved there and a later call continues
    from the last saved epoch. CUDA out of memory restarts from that epoch with half the batch
    and twice the accumulation steps (the same effective batch). Without validation rows (a
    refit on all rows) the last epoch is kept.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite.
    """
    batch, accum = cfg.batch_size, cfg.grad_accum_steps
    while True:
        try:
            return _fit(
                train_paths,
                train_labels,
                val_paths,
                val_labels,
                num_classes,
                cfg,
                device,
                num_workers,
                on_epoch,
                checkpoint,
                batch,
                accum,
            )
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch, accum = batch // 2, accum * 2
            log.warning(
                "CUDA out of memory: retrying from the last checkpoint with batch size "
                "%d x %d accumulation steps",
                batch,
                accum,
            )
            release_memory()


@dataclass
class _Best:
    loss: float = math.inf
    epoch: int = -1
    state: dict | None = None
    probs: np.ndarray | None = None
    bad_epochs: int = 0


def _fit(
    train_paths,
    train_labels,
    val_paths,
    val_labels,
    num_classes,
    cfg,
    device,
    num_workers,
    on_epoch,
    checkpoint,
    batch,
    accum,
) -> FoldResult:
    seed_everything(cfg.seed)
    saved = checkpoint.load() if checkpoint else None
    if saved and saved["batch_size"] < batch:  # an earlier attempt ran out of memory
        batch, accum = saved["batch_size"], saved["grad_accum_steps"]
    model = create_model(local_weights(cfg), num_classes).to(device)
    mean, std = mean_std(model)
    opts = StepOptions(
        amp=amp_dtype(cfg, device),
        accum=accum,
        channels_last=cfg.channels_last and device.type == "cuda",
        cfg=cfg if cfg.mixup_prob + cfg.cutmix_prob > 0 else None,
    )
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # A last batch of one breaks BatchNorm in train mode; drop it when it would happen.
    train_loader = make_loader(
        train_paths,
        train_labels,
        build_transform(cfg.image_size, mean, std, cfg.augment),
        batch,
        shuffle=True,
        num_workers=num_workers,
        seed=cfg.seed,
        drop_last=len(train_paths) % batch == 1,
    )
    val_loader = make_loader(
        val_paths,
        val_labels,
        build_transform(cfg.image_size, mean, std, "none"),
        batch,
        shuffle=False,
        num_workers=num_workers,
    )
    optimizer = build_optimizer(cfg, model.parameters())
    steps = max(1, cfg.epochs * math.ceil(len(train_loader) / accum))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=steps, eta_min=cfg.lr_min
    )
    scaler = torch.amp.GradScaler("cuda", enabled=opts.amp == torch.float16)
    criterion = build_criterion(cfg, train_labels, num_classes, device)
    best, history, start = _Best(), [], 0
    if saved:
        start, history, best = _restore(saved, model, optimizer, scheduler, scaler)
        log.info("resuming from the checkpoint of epoch %d", start)
    runner = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    stopped_early = False
    for epoch in range(start, cfg.epochs):
        if (
            best.bad_epochs
            and cfg.early_stopping_patience
            and best.bad_epochs >= cfg.early_stopping_patience
        ):
            stopped_early = True
            break
        row, probs = _run_epoch(
            runner,
            model,
            epoch,
            cfg,
            train_loader,
            val_loader,
            optimizer,
            scheduler,
            scaler,
            criterion,
            device,
            opts,
        )
        history.append(row)
        _track_best(best, row, probs, model, epoch, has_val=len(val_paths) > 0)
        if checkpoint:
            checkpoint.save(
                _state(epoch, model, optimizer, scheduler, scaler, best, history, batch, accum)
            )
        if on_epoch:
            on_epoch(row)
    for loader in (train_loader, val_loader):
        _stop_workers(loader)
    if best.state is not None:
        model.load_state_dict(best.state)
    if opts.channels_last:  # callers save and serve the model in the default layout
        model = model.to(memory_format=torch.contiguous_format)
    probs = best.probs if best.probs is not None else np.zeros((0, num_classes), np.float32)
    return FoldResult(
        model=model,
        best_epoch=best.epoch,
        history=history,
        val_probs=probs,
        mean=mean,
        std=std,
        resumed_from_epoch=start,
        batch_size=batch,
        grad_accum_steps=accum,
        stopped_early=stopped_early,
    )


def _stop_workers(loader: DataLoader) -> None:
    """Persistent workers would otherwise live until garbage collection, holding memory and
    open files after the fold is done."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def _run_epoch(
    runner,
    model,
    epoch,
    cfg,
    train_loader,
    val_loader,
    optimizer,
    scheduler,
    scaler,
    criterion,
    device,
    opts,
) -> tuple[dict, np.ndarray | None]:
    t0 = time.perf_counter()
    frozen = epoch < cfg.freeze_backbone_epochs
    set_backbone_trainable(model, not frozen)
    # The loader's shuffle depends on (seed, epoch) only, so a resumed run sees the same order.
    train_loader.generator.manual_seed(cfg.seed + epoch)
    model.train()
    if frozen:
        _freeze_batchnorm(model)
    tr = train_one_epoch(
        runner, train_loader, optimizer, scheduler, criterion, device, opts, scaler
    )
    row = {
        "epoch": epoch,
        "lr": scheduler.get_last_lr()[0],
        "frozen_backbone": frozen,
        **{f"train_{k}": v for k, v in tr.items()},
    }
    probs = None
    if len(val_loader.dataset):
        va, probs = evaluate(runner, val_loader, criterion, device, opts)
        if not math.isfinite(va["loss"]) or not np.isfinite(probs).all():
            raise NonFiniteLoss(
                f"validation loss became {va['loss']} in epoch {epoch}: lower "
                "the lr or check the data"
            )
        row.update({f"val_{k}": v for k, v in va.items()})
    row["seconds"] = time.perf_counter() - t0
    return row, probs


def _track_best(best: _Best, row: dict, probs, model, epoch: int, has_val: bool) -> None:
    if has_val and row["val_loss"] >= best.loss:
        best.bad_epochs += 1
        return
    best.loss = row["val_loss"] if has_val else math.inf
    best.epoch, best.probs, best.bad_epochs = epoch, probs, 0
    best.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _state(epoch, model, optimizer, scheduler, scaler, best: _Best, history, batch, accum) -> dict:
    """A checkpoint that ``torch.load(weights_only=True)`` can read: tensors, numbers, lists,
    dicts and strings only."""
    same = best.epoch == epoch  # the best weights are the current ones: store them once
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "history": history,
        "batch_size": batch,
        "grad_accum_steps": accum,
        "best": {
            "loss": best.loss,
            "epoch": best.epoch,
            "bad_epochs": best.bad_epochs,
            "state": None if same else best.state,
            "probs": None if best.probs is None else torch.from_numpy(best.probs),
        },
    }


def _restore(saved: dict, model, optimizer, scheduler, scaler) -> tuple[int, list, _Best]:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:  # a disabled scaler saves an empty dict and refuses to load one
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    b = saved["best"]
    state = (
        b["state"]
        if b["state"] is not None
        else {k: v.detach().clone() for k, v in model.state_dict().items()}
    )
    best = _Best(
        loss=b["loss"],
        epoch=b["epoch"],
        state=state,
        bad_epochs=b["bad_epochs"],
        probs=None if b["probs"] is None else b["probs"].numpy(),
    )
    return saved["epoch"] + 1, list(saved["history"]), best
