"""The state of one attempt at a fold: the ``Trainer`` runs an epoch, gives its checkpoint
(``state_dict``) and restores itself from one. Its pieces: ``darkroom.training.recipe`` (the
config's choices), ``darkroom.training.steps`` (loaders and passes over them),
``darkroom.training.feed`` (loaders over the decode-once cache), ``darkroom.training.rng``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from darkroom.config import TrainConfig
from darkroom.data.images import build_transform
from darkroom.model.backbone import create_model, mean_std
from darkroom.training.checkpoint import Best, weights_copy
from darkroom.training.distributed import Ranks
from darkroom.training.feed import fold_loaders
from darkroom.training.recipe import (
    amp_dtype,
    build_criterion,
    build_optimizer,
    freeze_batchnorm,
    local_weights,
    set_backbone_trainable,
)
from darkroom.training.records import EpochRow, FoldData, FoldResult
from darkroom.training.rng import rng_state, seed_everything, set_rng_state
from darkroom.training.steps import (
    NonFiniteLoss,
    StepOptions,
    evaluate,
    make_loader,
    stop_workers,
    train_one_epoch,
)


@dataclass
class Trainer:
    """One attempt at a fold: what an epoch needs and everything it changes."""

    data: FoldData
    cfg: TrainConfig
    model: torch.nn.Module
    runner: torch.nn.Module  # what runs the batches: the model, its DDP or compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    opts: StepOptions  # opts.accum: batches per optimizer step
    batch_size: int
    device: torch.device
    best: Best = field(default_factory=Best)
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0  # the first epoch this attempt trains
    ranks: Ranks = field(default_factory=Ranks)  # this process among the fold's processes

    @classmethod
    def build(
        cls,
        data: FoldData,
        cfg: TrainConfig,
        device: torch.device,
        num_workers: int | str,
        batch: int,
        accum: int,
        ranks: Ranks | None = None,
    ) -> Trainer:
        """A freshly seeded model with its optimizer, lr schedule and loaders, for ``batch``
        images a batch (over every rank) and ``accum`` batches an optimizer step."""
        ranks = ranks or Ranks()
        seed_everything(cfg.seed)
        model = create_model(local_weights(cfg), data.num_classes).to(device)
        mean, std = mean_std(model)
        opts = StepOptions(
            amp=amp_dtype(cfg, device),
            accum=accum,
            channels_last=cfg.channels_last and device.type == "cuda",
            cfg=cfg if cfg.mixup_prob + cfg.cutmix_prob > 0 else None,
            mean=mean,
            std=std,
        )
        if opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        train_loader, val_loader = _loaders(data, cfg, model, num_workers, batch, ranks)
        runner = ranks.wrap(model, device, find_unused=cfg.freeze_backbone_epochs > 0)
        optimizer = build_optimizer(cfg, model.parameters())
        steps = max(1, cfg.epochs * math.ceil(len(train_loader) / accum))
        return cls(
            data=data,
            cfg=cfg,
            model=model,
            runner=torch.compile(runner) if cfg.compile and device.type == "cuda" else runner,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, cfg.lr_min),
            scaler=torch.amp.GradScaler("cuda", enabled=opts.amp == torch.float16),
            criterion=build_criterion(cfg, data.train_labels, data.num_classes, device),
            train_loader=train_loader,
            val_loader=val_loader,
            opts=opts,
            batch_size=batch,
            device=device,
            ranks=ranks,
        )

    def run_epoch(self, epoch: int) -> EpochRow:
        """Trains and validates ``epoch``; returns its history row.

        Raises:
            NonFiniteLoss: the training or the validation loss is NaN or infinite.
        """
        t0, frozen = time.perf_counter(), epoch < self.cfg.freeze_backbone_epochs
        set_backbone_trainable(self.model, not frozen)
        # The shuffle depends on (seed, epoch) only, so a resumed run sees the same order.
        self.train_loader.generator.manual_seed(self.cfg.seed + epoch)
        self.ranks.begin_epoch(self.train_loader, self.cfg.seed, epoch)
        self.model.train()
        if frozen:
            freeze_batchnorm(self.model)
        stats = train_one_epoch(
            self.runner,
            self.train_loader,
            self.optimizer,
            self.scheduler,
            self.criterion,
            self.device,
            self.opts,
            self.scaler,
        )
        self.ranks.sync_buffers(self.model)
        val, probs = self._validate(epoch) if len(self.data.val_paths) else ({}, None)
        row = EpochRow(
            epoch=epoch,
            lr=self.scheduler.get_last_lr()[0],
            frozen_backbone=frozen,
            **{f"train_{k}": v for k, v in stats.items()},
            **{f"val_{k}": v for k, v in val.items()},
            seconds=time.perf_counter() - t0,
        )
        self.history.append(row.record())
        self._track_best(row, probs)
        return row

    def _validate(self, epoch: int) -> tuple[dict, np.ndarray]:
        if self.ranks.world > 1:  # each rank its part, gathered
            stats, probs = self.ranks.evaluate(self)
        else:
            ev = (self.val_loader, self.criterion, self.device, self.opts)
            stats, probs = evaluate(self.runner, *ev)
        if not math.isfinite(stats["loss"]) or not np.isfinite(probs).all():
            raise NonFiniteLoss(
                f"validation loss became {stats['loss']} in epoch {epoch}: lower "
                "the lr or check the data"
            )
        return stats, probs

    def _track_best(self, row: EpochRow, probs: np.ndarray | None) -> None:
        best, has_val = self.best, probs is not None
        if has_val and row.val_loss >= best.loss:
            best.bad_epochs += 1
            return
        best.loss = row.val_loss if has_val else math.inf
        best.epoch, best.probs, best.bad_epochs = row.epoch, probs, 0
        best.state = weights_copy(self.model)

    def patience_spent(self) -> bool:
        """Whether early stopping ends the fold before the next epoch."""
        patience = self.cfg.early_stopping_patience
        return bool(patience and self.best.bad_epochs >= patience)

    def state_dict(self, final: bool = False) -> dict:
        """The checkpoint after the last epoch run, readable by ``torch.load(weights_only=True)``:
        tensors, numbers, lists, dicts and strings only, each weight tensor once. ``final`` (no
        epoch follows): the best weights as ``model``, no optimizer, scheduler, scaler or RNG."""
        epoch, best = self.history[-1]["epoch"], self.best
        state = {
            "epoch": epoch,
            "final": final,
            "model": best.state if final else self.model.state_dict(),
            "history": self.history,
            "batch_size": self.batch_size,
            "grad_accum_steps": self.opts.accum,
            "best": {
                "loss": best.loss,
                "epoch": best.epoch,
                "bad_epochs": best.bad_epochs,
                # None: the best weights are "model" (the current epoch's, or final)
                "state": None if final or best.epoch == epoch else best.state,
                "probs": None if best.probs is None else torch.from_numpy(best.probs),
            },
        }
        if not final:
            state.update(
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                rng=rng_state(),
            )
        return state

    def restore(self, saved: dict) -> None:
        """Continues from a ``state_dict()``: the next epoch is the one after the saved one."""
        self.model.load_state_dict(saved["model"])
        if not saved.get("final"):  # a final checkpoint has no epoch left to train
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            if saved["scaler"]:  # a disabled scaler saves an empty dict and refuses to load one
                self.scaler.load_state_dict(saved["scaler"])
            set_rng_state(saved["rng"])
        b = saved["best"]
        self.best = Best(
            loss=b["loss"],
            epoch=b["epoch"],
            state=weights_copy(self.model) if b["state"] is None else b["state"],
            probs=None if b["probs"] is None else b["probs"].numpy(),
            bad_epochs=b["bad_epochs"],
        )
        self.history = list(saved["history"])
        self.start_epoch = saved["epoch"] + 1

    def close(self) -> None:
        """Shuts the loaders' persistent worker processes down."""
        stop_workers(self.train_loader)
        stop_workers(self.val_loader)

    def result(self, stopped_early: bool) -> FoldResult:
        """The best epoch's weights, in the default memory layout, and the run's record."""
        if self.best.state is not None:
            self.model.load_state_dict(self.best.state)
        if self.opts.channels_last:  # callers save and serve the model in the default layout
            self.model = self.model.to(memory_format=torch.contiguous_format)
        probs, mean, std = self.best.probs, *mean_std(self.model)
        return FoldResult(
            model=self.model,
            best_epoch=self.best.epoch,
            history=self.history,
            val_probs=np.zeros((0, self.data.num_classes), np.float32) if probs is None else probs,
            mean=mean,
            std=std,
            resumed_from_epoch=self.start_epoch,
            batch_size=self.batch_size,
            grad_accum_steps=self.opts.accum,
            stopped_early=stopped_early,
        )


def _loaders(data: FoldData, cfg: TrainConfig, model, num_workers, batch: int, ranks: Ranks):
    """The shuffled, augmented train loader and the validation loader in file order (of this
    rank's share); over cache entries, both are passes through one loader whose workers
    outlive the fold."""
    data, sampler, batch = ranks.split(data, batch, cfg.seed)
    if data.decoded:
        return fold_loaders(data, cfg.augment, batch, num_workers, cfg.seed, sampler)
    mean, std = mean_std(model)
    tf = lambda augment: build_transform(cfg.image_size, mean, std, augment)  # noqa: E731
    common = {"num_workers": num_workers, "limits": data.limits}
    train = make_loader(
        data.train_paths,
        data.train_labels,
        tf(cfg.augment),
        batch,
        shuffle=True,
        seed=cfg.seed,
        drop_last=len(data.train_paths if sampler is None else sampler) % batch == 1,
        sampler=sampler,
        **common,
    )
    return train, make_loader(
        data.val_paths, data.val_labels, tf("none"), batch, shuffle=False, **common
    )
