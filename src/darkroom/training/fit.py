"""Fine-tuning one fold: the tutorials' recipe (Adam, per-step cosine to lr_min, cross-entropy)
plus what an overnight run needs: a checkpoint to resume from (``darkroom.training.checkpoint``),
early stopping that keeps the best epoch, a frozen-backbone warm-up, mixed precision on CUDA,
and a retry with half the batch size when CUDA runs out of memory.

``fit`` drives a ``Trainer`` (``darkroom.training.trainer``): the whole state of one attempt
at a fold; ``fit`` runs its epochs, saves its checkpoints and starts a new attempt with half
the batch when CUDA runs out of memory."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from darkroom.config import TrainConfig
from darkroom.training.checkpoint import Checkpointer, SaveSchedule
from darkroom.training.distributed import Ranks
from darkroom.training.records import EpochRow, FoldData, FoldResult, FoldRun
from darkroom.training.trainer import Trainer

log = logging.getLogger(__name__)


def release_memory() -> None:
    """Returns cached GPU memory to the driver, so the next fold starts from an empty GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fit_run(run: FoldRun, device: torch.device) -> FoldResult:
    """``fit`` of a fold's run on one device."""
    return fit(
        run.data,
        run.train,
        device=device,
        num_workers=run.config.num_workers,
        on_epoch=run.on_epoch,
        checkpoint=run.checkpoint,
        checkpoint_every=run.config.checkpoint_every_seconds,
    )


def fit(
    data: FoldData,
    cfg: TrainConfig,
    *,
    device: torch.device,
    num_workers: int | str = 0,
    on_epoch: Callable[[EpochRow], None] | None = None,
    checkpoint: Checkpointer | None = None,
    checkpoint_every: float = 0.0,
    ranks: Ranks | None = None,
) -> FoldResult:
    """Trains a model on the train images, validating each epoch; keeps the best epoch.

    With ``checkpoint``, the state is saved there every ``checkpoint_every`` seconds at most
    (0: every epoch) and after the last epoch; a later call continues from the last saved epoch.
    CUDA out of memory restarts from that epoch with half the batch and twice the accumulation
    steps. Without validation images the last epoch is kept.

    Args:
        data: The fold's train and validation images.
        cfg: The recipe; its batch size and accumulation steps are where the batch starts.
        device: Where the model trains.
        num_workers: DataLoader worker processes, or "auto"; over cache entries they outlive
            the fit for the next one (``darkroom.training.feed``), else they stop when it ends.
        on_epoch: Called with each epoch's ``EpochRow``, after any checkpoint of it is saved.
        checkpoint: Where the training state is saved and resumed from (``SaveSchedule``).
        ranks: This process among a fold's DDP processes (``darkroom.training.distributed``); there,
            CUDA out of memory fails the fold (the ranks cannot halve their batch together).

    Raises:
        NonFiniteLoss: the loss became NaN or infinite.
        torch.cuda.OutOfMemoryError: even a batch of one image does not fit.
    """
    batch, accum = cfg.batch_size, cfg.grad_accum_steps
    while True:
        try:
            saved = checkpoint.load() if checkpoint else None
            if saved and saved["batch_size"] < batch:  # an earlier attempt ran out of memory
                batch, accum = saved["batch_size"], saved["grad_accum_steps"]
            trainer = Trainer.build(data, cfg, device, num_workers, batch, accum, ranks)
            return _train(trainer, saved, SaveSchedule(checkpoint, checkpoint_every), on_epoch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1 or (ranks and ranks.world > 1):
                raise
        # Out here the traceback is gone, so the failed attempt's GPU memory can be freed.
        saved = trainer = None
        batch, accum = batch // 2, accum * 2
        msg = "CUDA out of memory: retrying from the last checkpoint with batch %d x %d steps"
        log.warning(msg, batch, accum)
        release_memory()


def _train(trainer: Trainer, saved: dict | None, saves: SaveSchedule, on_epoch) -> FoldResult:
    """Runs ``trainer``'s epochs (after ``saved``'s, if given) up to early stopping."""
    if saved:
        trainer.restore(saved)
        log.info("resuming after the checkpoint of epoch %d", saved["epoch"])
    stopped_early, last = False, trainer.cfg.epochs - 1
    try:
        for epoch in range(trainer.start_epoch, trainer.cfg.epochs):
            if trainer.patience_spent():
                stopped_early = True
                break
            row = trainer.run_epoch(epoch)
            end = epoch == last or trainer.patience_spent()
            saves.after_epoch(epoch, trainer.state_dict, end)
            try:
                if on_epoch:
                    on_epoch(row)
            except BaseException:
                saves.save(epoch, trainer.state_dict)  # between epochs the state is whole
                raise
    finally:
        trainer.close()
    return trainer.result(stopped_early)
