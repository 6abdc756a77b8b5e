"""The training stage: one cross-validation fold (or the refit) of a candidate version, and the
candidate's final files once its folds are done. The loop itself lives in ``fit``."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
import pandas as pd

import darkroom
from darkroom import layout
from darkroom.config import RetrainConfig, TrainConfig
from darkroom.data.cache import DecodedCache, log_progress
from darkroom.data.images import UnreadableImage, decode_rgb
from darkroom.data.index import read_index
from darkroom.data.sync import local_paths
from darkroom.model import metrics as mx
from darkroom.model.backbone import create_model, hub_config, resolve_device, sha256, to_bytes
from darkroom.storage import Storage
from darkroom.training import plots
from darkroom.training.checkpoint import StorageCheckpointer
from darkroom.training.fit import fit, release_memory
from darkroom.training.records import FoldData, FoldResult, FoldSummary, LoaderLimits

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
    cfg = config.train
    file = lambda name: _fold_file(version, fold, cfg, name)  # noqa: E731
    done = storage.read_json(file("fold.json"), missing_ok=True)
    if done is not None:
        log.info("fold %d of %s already trained: reusing it", fold, version)
        return FoldSummary.from_record({**done, "reused": True})
    rows, classes, _ = read_index(storage, snapshot)
    train_rows, val_rows, fold_cfg = _fold_rows(storage, rows, version, fold, cfg)
    t0 = time.perf_counter()
    data = _fold_data(storage, config, train_rows, val_rows, len(classes))
    checkpoint = StorageCheckpointer(storage, file("checkpoint.pt"))
    result, weights, dev = _train_data(data, fold_cfg, config, device, on_epoch, checkpoint)
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


def _train_data(data, cfg, config, device, on_epoch, checkpoint) -> tuple[FoldResult, bytes, str]:
    """(the fit, its weights, where it ran) on one device, or in ``config.devices_per_fold``
    torchrun-style processes, one per device (``darkroom.training.launch``)."""
    if config.devices_per_fold > 1:
        from darkroom.training.launch import fit_in_processes

        result, weights = fit_in_processes(
            data, cfg, config, device or config.device, checkpoint, on_epoch
        )
        return result, weights, ",".join(r["device"] for r in result.ranks)
    dev = resolve_device(device or config.device)
    result, weights = _fit_weights(data, cfg, config, dev, on_epoch, checkpoint)
    return result, weights, str(dev)


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


def _fit_weights(data, cfg, config, device, on_epoch, checkpoint) -> tuple[FoldResult, bytes]:
    """The fit and its weights as safetensors bytes; a GPU is emptied either way, so the next
    fold (or task on this worker) starts from an empty GPU."""
    try:
        result = fit(
            data,
            cfg,
            device=device,
            num_workers=config.num_workers,
            on_epoch=on_epoch,
            checkpoint=checkpoint,
            checkpoint_every=config.checkpoint_every_seconds,
        )
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


def _fold_rows(storage: Storage, rows: pd.DataFrame, version: str, fold: int, cfg: TrainConfig):
    """(train rows, validation rows, the config to train with) of a fold or the refit."""
    train = rows[rows["split"] == "train"]
    if fold == cfg.folds:
        epochs = refit_epochs(storage, version, cfg)
        return train, train.iloc[:0], cfg.model_copy(update={"epochs": epochs})
    return train[train["fold"] != fold], train[train["fold"] == fold], cfg


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


def finalize_candidate(
    storage: Storage, cfg: TrainConfig, snapshot: str, version: str, folds: list[FoldSummary]
) -> dict:
    """Writes the candidate's ``model.safetensors`` (the best fold's, or the refit's), model.json
    (with the fold members when ``final_model="ensemble"``), oof.parquet, oof_metrics.json and
    the plots. Returns model.json."""
    rows, classes, _ = read_index(storage, snapshot)
    folds = sorted((s for s in folds if not s.refit), key=lambda s: s.fold)
    best = max(folds, key=lambda s: (s.metrics[cfg.metric], -s.fold))
    source = best
    if cfg.final_model == "refit":
        record = storage.read_json(
            layout.fold(version, 0, "fold.json", refit=True), missing_ok=True
        )
        if record is None:
            raise FileNotFoundError(
                f"final_model is refit but {version} has no refit/fold.json:"
                " train fold index cfg.folds first"
            )
        source = FoldSummary.from_record(record)
    weights = storage.read_bytes(
        layout.fold(version, source.fold, "model.safetensors", refit=source.refit)
    )
    storage.write_bytes(layout.version(version, "model.safetensors"), weights)
    meta = _model_meta(cfg, snapshot, version, classes, best, sha256(weights))
    if cfg.final_model == "refit":
        meta["refit_epochs"] = source.epochs_run
    if cfg.final_model == "ensemble":
        meta["ensemble"] = [{"key": layout.member(s.fold), "sha256": s.sha256} for s in folds]
    _write_timm_configs(storage, cfg, version, classes, best, folds)
    storage.write_json(layout.version(version, "model.json"), meta)
    _write_reports(storage, version, folds, classes, rows)
    return meta


def _write_timm_configs(storage: Storage, cfg: TrainConfig, version, classes, best, folds) -> None:
    """timm's config.json beside the version's weights, and beside each member's for an
    ensemble, so that ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads them."""
    model = create_model(cfg, len(classes), pretrained=False)
    config = hub_config(model, cfg.backbone, classes, cfg.image_size, best.mean, best.std)
    storage.write_json(layout.version(version, "config.json"), config)
    if cfg.final_model == "ensemble":
        for s in folds:
            storage.write_json(
                layout.version(version, layout.member(s.fold, "config.json")), config
            )


def _model_meta(
    cfg: TrainConfig, snapshot: str, version: str, classes, best: FoldSummary, sha: str
) -> dict:
    return {
        "version": version,
        "backbone": cfg.backbone,
        "classes": classes,
        "image_size": cfg.image_size,
        "mean": best.mean,
        "std": best.std,
        "train_config": cfg.model_dump(mode="json"),
        "index_snapshot": snapshot,
        "final_model": cfg.final_model,
        "chosen_fold": best.fold,
        "selection_metric": cfg.metric,
        "sha256": sha,
        "code_version": darkroom.__version__,
        "seed": cfg.seed,
        "created_at": datetime.now(UTC).isoformat(),
        "python": platform.python_version(),
    }


def _write_reports(storage: Storage, version: str, folds: list[FoldSummary], classes, rows) -> None:
    """oof.parquet, oof_metrics.json and the plots of a candidate."""
    key = lambda name: layout.version(version, name)  # noqa: E731
    oof = pd.concat(
        [storage.read_parquet(layout.fold(version, s.fold, "oof.parquet")) for s in folds],
        ignore_index=True,
    )
    storage.write_parquet(key("oof.parquet"), oof)
    train = rows[rows["split"] == "train"]
    counts = train["class_index"].value_counts().reindex(range(len(classes)), fill_value=0)
    oof_metrics = mx.classification_metrics(
        oof["class_index"].to_numpy(),
        np.stack(oof["probs"].to_numpy()),
        classes,
        train_counts=counts.tolist(),
    )
    cv = mx.aggregate([s.metrics for s in folds])
    storage.write_json(key("oof_metrics.json"), {"oof": oof_metrics, "cv": cv})
    histories = {
        s.fold: storage.read_json(layout.fold(version, s.fold, "fold.json"))["history"]
        for s in folds
    }
    storage.write_bytes(key("curves.png"), plots.curves_png(histories))
    cm = oof_metrics["confusion_matrix"]
    storage.write_bytes(
        key("confusion.png"), plots.confusion_png(cm, classes, "out-of-fold confusion matrix")
    )
    storage.write_bytes(
        key("per_class.png"),
        plots.per_class_png(
            oof_metrics["per_class_accuracy"], oof_metrics["per_class_train_images"]
        ),
    )
    storage.write_bytes(key("mistakes.png"), _mistakes_png(storage, oof, classes))


def _mistakes_png(storage: Storage, oof: pd.DataFrame, classes: list[str], n: int = 16) -> bytes:
    """The most confident wrong out-of-fold predictions, with their images."""
    wrong = oof[oof["pred_index"] != oof["class_index"]]
    items = []
    for r in wrong.sort_values("confidence", ascending=False).head(n).itertuples():
        try:
            image = decode_rgb(storage.read_bytes(r.key))
        except (FileNotFoundError, UnreadableImage):
            image = None  # a gallery without one picture beats no gallery
        items.append((image, r.label, classes[r.pred_index], float(r.confidence)))
    return plots.mistakes_png(items)
