"""Training tasks: one per fold (retried, on any worker), then the candidate's files."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from darkroom import evaluation, pipeline
from darkroom.config import TrainConfig
from tasks.common import retry_unless_permanent


@task(task_run_name="train-fold-{fold}", retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def train_fold(storage_uri: str, cache_dir: str, snapshot: str, fold: int, version: str,
               cfg: TrainConfig, device: str = "auto", num_workers: int = 0) -> dict:
    logger = get_run_logger()

    def on_epoch(row: dict) -> None:
        logger.info("fold %d/%d epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f "
                    "f1 %.4f (%.1fs)", fold + 1, cfg.folds, row["epoch"] + 1, cfg.epochs,
                    row["train_loss"], row["train_accuracy"], row["val_loss"],
                    row["val_accuracy"], row["val_f1_macro"], row["seconds"])

    return pipeline.train_fold(storage_uri, cache_dir, snapshot, fold, version, cfg, device,
                               num_workers, on_epoch=on_epoch)


@task(name="finalize-candidate", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def finalize_candidate(storage_uri: str, version: str, snapshot: str, fold_summaries: list[dict],
                       cfg: TrainConfig) -> dict:
    return pipeline.finalize_candidate(storage_uri, version, snapshot, fold_summaries, cfg)


@task(task_run_name="evaluate-holdout-{version}", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_permanent, cache_policy=NO_CACHE)
def evaluate_holdout(storage_uri: str, cache_dir: str, snapshot: str, version: str,
                     device: str = "auto") -> dict:
    return evaluation.evaluate_holdout(storage_uri, cache_dir, snapshot, version, device)
