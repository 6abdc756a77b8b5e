"""Training tasks: one per fold (retried, on any worker), then the candidate's files."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from darkroom.config import RetrainConfig
from darkroom.model import backbone as model
from darkroom.model.backbone import resolve_device
from darkroom.storage import open_storage
from darkroom.training import auto_lr, candidate
from darkroom.training import fold as train
from darkroom.training.records import CandidateReport, EpochRow
from tasks.gpus import gpu_slot
from tasks.progress import progress_bar
from tasks.retry import io_task


@task(name="check-pretrained-weights", cache_policy=NO_CACHE)
def check_pretrained(config: RetrainConfig) -> None:
    """Stops the run before any work when pretrained weights cannot be had (not retried)."""
    model.check_pretrained(config.train)


@io_task(name="choose-lr", retries=2, retry_delay_seconds=30)
def choose_lr(config: RetrainConfig, snapshot: str, version: str) -> float | None:
    """``lr: auto``: the range test on the first fold's training rows picks the lr every fold
    trains at (kept with the version; a rerun reads it back). None when the lr is a number."""
    if not auto_lr.is_auto(config.train):
        return None
    storage = open_storage(config.storage)
    with gpu_slot(config.device) as dev:
        choice = auto_lr.choose(
            storage, config.model_copy(update={"device": dev}), snapshot, version
        )
    get_run_logger().info("lr auto: %.3g, %s", choice.lr, choice.reason)
    return choice.lr


@io_task(task_run_name="train-fold-{fold}", retries=2, retry_delay_seconds=30)
def train_fold(config: RetrainConfig, snapshot: str, version: str, fold: int) -> train.FoldSummary:
    """One fold. With several GPUs each fold holds ``devices_per_fold`` slots of the
    ``darkroom-gpu`` global concurrency limit and trains on GPUs of its own (see
    tasks.common.gpu_slot); on several, in one process per GPU (darkroom.training.launch)."""
    storage = open_storage(config.storage)
    cfg = config.train
    with gpu_slot(config.device, count=config.devices_per_fold) as dev:
        where = dev if "," in dev else str(resolve_device(dev))
        if config.devices_per_fold > 1:
            where = f"{config.devices_per_fold} processes on {where}"
        on_epoch = EpochProgress(fold, cfg.folds, cfg.epochs, where)
        try:
            return train.train_fold(
                storage, config, snapshot, version, fold, device=dev, on_epoch=on_epoch
            )
        finally:
            on_epoch.close()


class EpochProgress:
    """The ``on_epoch`` callback of a fold: a Prefect progress artifact updated each epoch
    (fold k of K, epoch e of E, current metrics), plus a terminal bar or a log line."""

    def __init__(self, fold: int, folds: int, epochs: int, device: str):
        self.fold, self.folds, self.epochs, self.device = fold, folds, epochs, device
        self.logger = get_run_logger()
        self.bar = progress_bar(f"fold {fold + 1}/{folds}", unit="epoch", position=fold)
        self.artifact = None

    def __call__(self, row: EpochRow) -> None:
        e = row.epoch + 1
        if self.bar is not None:
            self.bar(
                e,
                self.epochs,
                loss=f"{row.train_loss:.4f}",
                val_loss=_shown(row.val_loss),
                val_acc=_shown(row.val_accuracy),
            )
        else:
            self.logger.info(
                "fold %d/%d epoch %d/%d: train loss %.4f acc %.4f | val loss %s acc %s "
                "f1 %s (%.1fs)",
                self.fold + 1,
                self.folds,
                e,
                self.epochs,
                row.train_loss,
                row.train_accuracy,
                _shown(row.val_loss),
                _shown(row.val_accuracy),
                _shown(row.val_f1_macro),
                row.seconds,
            )
        self._artifact(row)

    def _artifact(self, row: EpochRow) -> None:
        e = row.epoch + 1
        pct = 100.0 * e / self.epochs
        which = (
            f"fold {self.fold + 1} of {self.folds}"
            if self.fold < self.folds
            else "refit on every train row"
        )
        text = (
            f"train-fold-{self.fold}: {which}, epoch {e} of "
            f"{self.epochs} on {self.device} | val accuracy {_shown(row.val_accuracy)}, "
            f"val F1 {_shown(row.val_f1_macro)}, val loss {_shown(row.val_loss)}, "
            f"train loss {row.train_loss:.4f}, train accuracy "
            f"{row.train_accuracy:.4f}, lr {row.lr:.2e}, {row.seconds:.1f}s/epoch"
        )
        try:  # the artifact is for people: it must never fail a fold
            if self.artifact is None:
                self.artifact = create_progress_artifact(pct, description=text)
            else:
                update_progress_artifact(self.artifact, pct, description=text)
        except Exception as exc:
            self.logger.warning("could not update the progress artifact: %s", exc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _shown(value: float | None) -> str:
    """A validation number, or a dash for the refit (no validation images)."""
    return "-" if value is None else f"{value:.4f}"


@io_task(name="finalize-candidate", retries=2, retry_delay_seconds=10)
def finalize_candidate(
    config: RetrainConfig, snapshot: str, version: str, folds: list[train.FoldSummary]
) -> CandidateReport:
    storage = open_storage(config.storage)
    return candidate.finalize_candidate(storage, config.train, snapshot, version, folds)
