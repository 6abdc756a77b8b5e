"""The training stage's entry: one cross-validation fold (or the refit) of a candidate version.
It hands the fold's run (``FoldRun``) down to the loop (``fit``, over a ``trainer.Trainer``)
on one device, or to ``launch`` on several; ``candidate`` writes the candidate's final files
once its folds are done."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from darkroom import layout
from darkroom.config import RetrainConfig, TrainConfig
from darkroom.data.cache import DecodedCache, log_progress
from darkroom.data.fetch import local_paths
from darkroom.data.index import read_index
from darkroom.model import metrics as mx
from darkroom.model.backbone import resolve_device, sha256, to_bytes
from darkroom.storage import Storage
from darkroom.training import auto_lr
from darkroom.training.checkpoint import StorageCheckpointer
from darkroom.training.fit import fit_run, release_memory
from darkroom.training.records import FoldData, FoldResult, FoldRun, FoldSummary, LoaderLimits

log = logging.getLogger(__name__)


def _fold_file(version: str, fold: int, cfg: TrainConfig, name: str) -> str:
    """A file of fold ``fold``; ``fold == cfg.folds`` is the refit on every train row."""
    return layout.fold(version, fold, name, refit=fold == cfg.folds)


def train_fold(
    storage: Storage,
    config: RetrainConfig,
    snapshot: str,
    version: str,
    fold: int,
    *,
    device: str | None = None,
    on_epoch=None,
) -> FoldSummary:
    """Trains fold ``fold`` of ``snapshot`` into ``models/<version>/folds/<fold>/``
    (model.safetensors, oof.parquet, and fold.json last). Returns a summary, never the model.

    A fold whose fold.json exists is done (the version encodes snapshot, config and code): its
    summary is returned without training. An unfinished fold continues from its last epoch
    checkpoint. ``fold == cfg.folds`` is the refit on every train row (``final_model="refit"``).
    With ``config.devices_per_fold`` > 1 it trains in that many processes (``darkroom.training.launch``).

    Raises:
        NonFiniteLoss: training diverged; no fold.json is written, so the fold is never used.
    """
    if (done := _trained(storage, version, fold, config.train)) is not None:
        return done
    config = auto_lr.resolve(storage, config, snapshot, version)  # lr auto: the version's lr
    cfg = config.train
    file = lambda name: _fold_file(version, fold, cfg, name)  # noqa: E731
    train_rows, val_rows, classes, fold_cfg = _fold_rows(storage, snapshot, version, fold, cfg)
    t0 = time.perf_counter()
    data = _fold_data(storage, config, train_rows, val_rows, len(classes))
    checkpointer = StorageCheckpointer(storage, file("checkpoint.pt"))
    config = config.model_copy(update={"train": fold_cfg})
    run = FoldRun(data, config, device or config.device, on_epoch, checkpointer)
    result, weights, dev = _train_data(run)
    storage.write_bytes(file("model.safetensors"), weights)
    summary = FoldSummary(
        **_fit_facts(result),
        fold=fold,
        version=version,
        refit=fold == cfg.folds,
        train_images=len(train_rows),
        val_images=len(val_rows),
        seconds=time.perf_counter() - t0,
        device=dev,
        weights=storage.url(file("model.safetensors")),
        sha256=sha256(weights),
    )
    _finish_fold(storage, summary, result, train_rows, val_rows, classes)
    return summary


def _trained(storage: Storage, version: str, fold: int, cfg: TrainConfig) -> FoldSummary | None:
    """The summary of a fold whose fold.json exists (it is done), or None."""
    done = storage.read_json(_fold_file(version, fold, cfg, "fold.json"), missing_ok=True)
    if done is None:
        return None
    log.info("fold %d of %s already trained: reusing it", fold, version)
    return FoldSummary.from_record({**done, "reused": True})


def _train_data(run: FoldRun) -> tuple[FoldResult, bytes, str]:
    """(the fit, its weights, where it ran) on one device, or in ``config.devices_per_fold``
    torchrun-style processes, one per device (``darkroom.training.launch``)."""
    if run.config.devices_per_fold > 1:
        from darkroom.training.launch import fit_in_processes

        result, weights = fit_in_processes(run)
        return result, weights, ",".join(r["device"] for r in result.ranks)
    device = resolve_device(run.device)
    return *_fit_weights(run, device), str(device)


def _fold_data(storage: Storage, config: RetrainConfig, train_rows, val_rows, n: int) -> FoldData:
    """Local files and labels of the fold's rows (a worker that never synced fetches them),
    as entries of the decode-once cache unless it is off: the first fold of a retrain decodes
    the images that are not cached yet, the other folds and later retrains find them."""
    cache = config.cache_path(storage.uri)
    paths = local_paths(storage, train_rows, cache), local_paths(storage, val_rows, cache)
    decoded = config.decoded_cache_gib > 0
    if decoded:
        side, limit = config.train.image_size, int(config.decoded_cache_gib * 2**30)
        built = DecodedCache(cache / "decoded", side, limit).build(
            [*train_rows["image_id"], *val_rows["image_id"]],
            [*paths[0], *paths[1]],
            max_pixels=config.max_image_pixels,
            progress=log_progress(f"decode-once cache at {side} px"),
        )
        paths = built.entries[: len(train_rows)], built.entries[len(train_rows) :]
    return FoldData(
        paths[0],
        train_rows["class_index"].tolist(),
        paths[1],
        val_rows["class_index"].tolist(),
        n,
        LoaderLimits(config.max_image_pixels, config.loader_timeout_seconds),
        decoded=decoded,
    )


def _fit_weights(run: FoldRun, device: torch.device) -> tuple[FoldResult, bytes]:
    """The fit and its weights as safetensors bytes; a GPU is emptied either way, so the next
    fold (or task on this worker) starts from an empty GPU."""
    try:
        result = fit_run(run, device)
        return result, to_bytes(result.model)
    finally:
        if device.type == "cuda":  # on a CPU a full gc.collect (~0.5 s) frees no tensor here
            release_memory()


def _fit_facts(result: FoldResult) -> dict:
    return {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "batch_size": result.batch_size,
        "grad_accum_steps": result.grad_accum_steps,
        "mean": result.mean,
        "std": result.std,
        "ranks": result.ranks,
    }


def _fold_rows(storage: Storage, snapshot: str, version: str, fold: int, cfg: TrainConfig):
    """(train rows, validation rows, class names, the config to train with) of a fold or the
    refit, from the index snapshot."""
    rows, classes, _ = read_index(storage, snapshot)
    train = rows[rows["split"] == "train"]
    if fold == cfg.folds:
        epochs = refit_epochs(storage, version, cfg)
        return train, train.iloc[:0], classes, cfg.model_copy(update={"epochs": epochs})
    return train[train["fold"] != fold], train[train["fold"] == fold], classes, cfg


def _finish_fold(
    storage: Storage, summary: FoldSummary, result: FoldResult, train_rows, val_rows, classes
) -> None:
    """Validation metrics and oof.parquet, then fold.json (the fold's done mark), then the
    checkpoint goes: its resume state is dead weight now."""
    file = lambda name: layout.fold(summary.version, summary.fold, name, refit=summary.refit)  # noqa: E731
    full = {}
    if not summary.refit:
        counts = train_rows["class_index"].value_counts().reindex(range(len(classes)), fill_value=0)
        full = mx.classification_metrics(
            val_rows["class_index"].to_numpy(),
            result.val_probs,
            classes,
            train_counts=counts.tolist(),
        )
        summary.metrics = {k: full[k] for k in mx.SCALARS if k in full}
        probs = result.val_probs
        oof = val_rows[["image_id", "key", "label", "class_index"]].assign(
            fold=summary.fold,
            pred_index=probs.argmax(1),
            confidence=probs.max(1),
            probs=list(probs),
        )
        storage.write_parquet(file("oof.parquet"), oof)
    record = {**asdict(summary), "history": result.history, "full_metrics": full}
    storage.write_json(file("fold.json"), record)
    storage.delete(file("checkpoint.pt"))


def refit_epochs(storage: Storage, version: str, cfg: TrainConfig) -> int:
    """The folds' mean best epoch count (rounded, at least 1), from their fold.json files."""
    best = []
    for k in range(cfg.folds):
        rec = storage.read_json(layout.fold(version, k, "fold.json"), missing_ok=True)
        if rec is None:
            raise FileNotFoundError(
                f"fold {k} of {version} has not finished: the refit needs every fold's best epoch"
            )
        best.append(rec["best_epoch"] + 1)
    return max(1, round(float(np.mean(best))))
