"""The pipeline's stages as plain functions over references (storage URI, snapshot, version,
fold). Each is one Prefect task in ``tasks/``; each also runs alone without Prefect, on any
worker: it pulls what it needs through the local cache."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

import darkroom
from darkroom import index as idx
from darkroom import metrics as mx
from darkroom import plots, registry
from darkroom.config import TrainConfig
from darkroom.model import resolve_device, sha256, to_bytes
from darkroom.storage import open_storage
from darkroom.sync import load_manifest, local_paths, sync_prefix
from darkroom.fit import fit, release_memory

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None


# ---- sync and index -------------------------------------------------------------------------


def sync_labeled(
    storage_uri: str, cache_dir: str, concurrency: int = 16, progress: Progress = None
) -> dict:
    report, _ = sync_prefix(
        open_storage(storage_uri),
        idx.LABELED,
        cache_dir,
        concurrency=concurrency,
        progress=progress,
    )
    return report.as_dict()


def rebuild_index(
    storage_uri: str,
    cache_dir: str,
    folds: int,
    seed: int,
    holdout_fraction: float,
    run_name: str = "",
    progress: Progress = None,
) -> dict:
    """Indexes the synced labeled images; writes the snapshot, the pointer and a quarantine
    report of unusable images. Returns the pointer plus a summary."""
    storage = open_storage(storage_uri)
    objects = load_manifest(Path(cache_dir), idx.LABELED)
    previous = None
    with contextlib.suppress(FileNotFoundError):
        previous, _, _ = idx.read_index(storage)
    df, classes = idx.build_index(
        objects,
        labels=idx.read_label_file(storage),
        folds=folds,
        seed=seed,
        holdout_fraction=holdout_fraction,
        previous=previous,
        progress=progress,
    )
    pointer = idx.write_index(
        storage, df, classes, folds=folds, seed=seed, holdout_fraction=holdout_fraction
    )
    bad = df[df["status"] != "ok"]
    if len(bad):
        name = run_name or f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
        key = f"reports/quarantine/{name}.parquet"
        buf = io.BytesIO()
        bad.to_parquet(buf, index=False)
        storage.write_bytes(key, buf.getvalue())
        pointer["quarantine"] = key
    pointer["summary"] = idx.summarize(df)
    return pointer


# ---- training ----------------------------------------------------------------------------


class StorageCheckpointer:
    """A fold's training state in storage: one object, replaced whole after every epoch."""

    def __init__(self, storage, key: str):
        self.storage, self.key = storage, key

    def load(self) -> dict | None:
        try:
            data = self.storage.read_bytes(self.key)
        except FileNotFoundError:
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        self.storage.write_bytes(self.key, buf.getvalue())


def fold_prefix(version: str, fold: int, cfg: TrainConfig) -> str:
    """``folds/<k>/`` for a cross-validation fold; ``refit/`` for fold == cfg.folds."""
    return registry.version_key(version, "refit/" if fold == cfg.folds else f"folds/{fold}/")


def _summary_of(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("history", "full_metrics")}


def train_fold(
    storage_uri: str,
    cache_dir: str,
    snapshot: str,
    fold: int,
    version: str,
    cfg: TrainConfig,
    device: str = "auto",
    num_workers: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Trains fold ``fold`` of ``snapshot``; writes ``models/<version>/folds/<fold>/``
    (model.safetensors, oof.parquet, and fold.json last; the per-epoch checkpoint.pt lives
    only until fold.json exists). Returns a small
    summary, never the model.

    The version encodes snapshot, config and code version, so a fold whose fold.json exists
    is done: its stored summary is returned without training. An unfinished fold continues
    from its last epoch checkpoint. ``fold == cfg.folds`` is the refit on every train row (for
    ``final_model="refit"``), for the folds' mean best epoch count, written to ``refit/``.

    Raises:
        NonFiniteLoss: training diverged; no fold.json is written, so the fold is never used.
    """
    storage = open_storage(storage_uri)
    prefix = fold_prefix(version, fold, cfg)
    done = registry.read_json(storage, prefix + "fold.json")
    if done is not None:
        log.info("fold %d of %s already trained: reusing it", fold, version)
        return {**_summary_of(done), "reused": True}
    df, classes, _ = idx.read_index(storage, snapshot)
    train = df[df["split"] == "train"]
    refit = fold == cfg.folds
    train_rows = train if refit else train[train["fold"] != fold]
    val_rows = train.iloc[:0] if refit else train[train["fold"] == fold]
    fold_cfg = (
        cfg.model_copy(update={"epochs": refit_epochs(storage, version, cfg)}) if refit else cfg
    )
    dev = resolve_device(device)
    t0 = time.perf_counter()
    try:
        result = fit(
            local_paths(storage, train_rows, cache_dir),
            train_rows["class_index"].tolist(),
            local_paths(storage, val_rows, cache_dir),
            val_rows["class_index"].tolist(),
            len(classes),
            fold_cfg,
            device=dev,
            num_workers=num_workers,
            on_epoch=on_epoch,
            checkpoint=StorageCheckpointer(storage, prefix + "checkpoint.pt"),
        )
        weights = to_bytes(result.model)
    finally:
        release_memory()  # the next fold (or task on this worker) starts from an empty GPU
    storage.write_bytes(prefix + "model.safetensors", weights)
    summary = {
        "fold": fold,
        "version": version,
        "refit": refit,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "batch_size": result.batch_size,
        "grad_accum_steps": result.grad_accum_steps,
        "train_images": len(train_rows),
        "val_images": len(val_rows),
        "seconds": time.perf_counter() - t0,
        "device": str(dev),
        "weights": storage.url(prefix + "model.safetensors"),
        "sha256": sha256(weights),
        "mean": result.mean,
        "std": result.std,
        "metrics": {},
    }
    full = {}
    if not refit:
        counts = train_rows["class_index"].value_counts().reindex(range(len(classes)), fill_value=0)
        full = mx.classification_metrics(
            val_rows["class_index"].to_numpy(),
            result.val_probs,
            classes,
            train_counts=counts.tolist(),
        )
        summary["metrics"] = {k: full[k] for k in mx.SCALARS if k in full}
        _write_oof(storage, prefix, val_rows, fold, result.val_probs)
    registry.write_json(
        storage, prefix + "fold.json", {**summary, "history": result.history, "full_metrics": full}
    )
    # fold.json marks the fold done; its resume state (weights + optimizer) is dead weight now.
    storage.delete(prefix + "checkpoint.pt")
    return summary


def _write_oof(storage, prefix: str, val_rows, fold: int, probs: np.ndarray) -> None:
    oof = val_rows[["image_id", "key", "label", "class_index"]].assign(
        fold=fold, pred_index=probs.argmax(1), confidence=probs.max(1), probs=list(probs)
    )
    buf = io.BytesIO()
    oof.to_parquet(buf, index=False)
    storage.write_bytes(prefix + "oof.parquet", buf.getvalue())


def refit_epochs(storage, version: str, cfg: TrainConfig) -> int:
    """The folds' mean best epoch count (rounded, at least 1), from their fold.json files."""
    best = []
    for k in range(cfg.folds):
        rec = registry.read_json(storage, registry.version_key(version, f"folds/{k}/fold.json"))
        if rec is None:
            raise FileNotFoundError(
                f"fold {k} of {version} has not finished: the refit needs every fold's best epoch"
            )
        best.append(rec["best_epoch"] + 1)
    return max(1, round(float(np.mean(best))))


def finalize_candidate(
    storage_uri: str, version: str, snapshot: str, fold_summaries: list[dict], cfg: TrainConfig
) -> dict:
    """Writes the candidate's ``model.safetensors`` (the best fold's, or the refit's), model.json
    (with the fold members when ``final_model="ensemble"``), oof.parquet, oof_metrics.json and
    the plots. Returns model.json."""
    storage = open_storage(storage_uri)
    df, classes, _ = idx.read_index(storage, snapshot)
    folds = sorted((s for s in fold_summaries if not s.get("refit")), key=lambda s: s["fold"])
    best = max(folds, key=lambda s: (s["metrics"][cfg.metric], -s["fold"]))
    source = best
    if cfg.final_model == "refit":
        source = registry.read_json(storage, fold_prefix(version, cfg.folds, cfg) + "fold.json")
        if source is None:
            raise FileNotFoundError(
                f"final_model is refit but {version} has no refit/fold.json:"
                " train fold index cfg.folds first"
            )
    weights = storage.read_bytes(fold_prefix(version, source["fold"], cfg) + "model.safetensors")
    storage.write_bytes(registry.version_key(version, "model.safetensors"), weights)
    meta = {
        "version": version,
        "backbone": cfg.backbone,
        "classes": classes,
        "image_size": cfg.image_size,
        "mean": best["mean"],
        "std": best["std"],
        "train_config": cfg.model_dump(mode="json"),
        "index_snapshot": snapshot,
        "final_model": cfg.final_model,
        "chosen_fold": best["fold"],
        "selection_metric": cfg.metric,
        "sha256": sha256(weights),
        "code_version": darkroom.__version__,
        "seed": cfg.seed,
        "created_at": datetime.now(UTC).isoformat(),
        "python": platform.python_version(),
    }
    if cfg.final_model == "refit":
        meta["refit_epochs"] = source["epochs_run"]
    if cfg.final_model == "ensemble":
        meta["ensemble"] = [
            {"key": f"folds/{s['fold']}/model.safetensors", "sha256": s["sha256"]} for s in folds
        ]
    registry.write_json(storage, registry.version_key(version, "model.json"), meta)
    _write_reports(storage, version, folds, classes, df)
    return meta


def _write_reports(storage, version: str, folds: list[dict], classes: list[str], df) -> None:
    """oof.parquet, oof_metrics.json and the plots of a candidate."""
    key = lambda name: registry.version_key(version, name)  # noqa: E731
    oof = pd.concat(
        [
            pd.read_parquet(io.BytesIO(storage.read_bytes(key(f"folds/{s['fold']}/oof.parquet"))))
            for s in folds
        ],
        ignore_index=True,
    )
    buf = io.BytesIO()
    oof.to_parquet(buf, index=False)
    storage.write_bytes(key("oof.parquet"), buf.getvalue())
    train = df[df["split"] == "train"]
    counts = train["class_index"].value_counts().reindex(range(len(classes)), fill_value=0)
    probs = np.stack(oof["probs"].to_numpy())
    oof_metrics = mx.classification_metrics(
        oof["class_index"].to_numpy(), probs, classes, train_counts=counts.tolist()
    )
    registry.write_json(
        storage,
        key("oof_metrics.json"),
        {"oof": oof_metrics, "cv": mx.aggregate([s["metrics"] for s in folds])},
    )
    histories = {
        s["fold"]: json.loads(storage.read_text(key(f"folds/{s['fold']}/fold.json")))["history"]
        for s in folds
    }
    storage.write_bytes(key("curves.png"), plots.curves_png(histories))
    storage.write_bytes(
        key("confusion.png"),
        plots.confusion_png(
            oof_metrics["confusion_matrix"], classes, "out-of-fold confusion matrix"
        ),
    )
    storage.write_bytes(
        key("per_class.png"),
        plots.per_class_png(
            oof_metrics["per_class_accuracy"], oof_metrics["per_class_train_images"]
        ),
    )
    storage.write_bytes(key("mistakes.png"), _mistakes_png(storage, oof, classes))


def _mistakes_png(storage, oof: pd.DataFrame, classes: list[str], n: int = 16) -> bytes:
    """The most confident wrong out-of-fold predictions, with their images."""
    wrong = (
        oof[oof["pred_index"] != oof["class_index"]]
        .sort_values("confidence", ascending=False)
        .head(n)
    )
    items = []
    for r in wrong.itertuples():
        try:
            image = read_rgb_bytes(storage.read_bytes(r.key))
        except (FileNotFoundError, ValueError):
            image = None  # a gallery without one picture beats no gallery
        items.append((image, r.label, classes[r.pred_index], float(r.confidence)))
    return plots.mistakes_png(items)


def read_rgb_bytes(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("undecodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ---- learning-rate range test ---------------------------------------------------------------


def find_lr(
    storage_uri: str,
    cache_dir: str,
    cfg: TrainConfig,
    device: str = "auto",
    num_workers: int = 0,
    snapshot: str | None = None,
    steps: int = 100,
) -> dict:
    """The lr range test on the train rows of ``snapshot`` (default: the current index).
    Writes ``reports/lr_finder/<snapshot>-<config>.png`` and ``.json``; returns the result
    with their keys."""
    from darkroom.lr_finder import range_test

    storage = open_storage(storage_uri)
    df, classes, snapshot = idx.read_index(storage, snapshot)
    rows = df[df["split"] == "train"]
    try:
        result = range_test(
            local_paths(storage, rows, cache_dir),
            rows["class_index"].tolist(),
            len(classes),
            cfg,
            device=resolve_device(device),
            num_workers=num_workers,
            steps=steps,
        )
    finally:
        release_memory()
    base = f"reports/lr_finder/{snapshot[:8]}-{cfg.fingerprint()[:8]}"
    storage.write_bytes(
        base + ".png", plots.lr_finder_png(result["lrs"], result["losses"], result["suggested_lr"])
    )
    out = {
        **result,
        "snapshot": snapshot,
        "train_config": cfg.model_dump(mode="json"),
        "plot": storage.url(base + ".png"),
        "json": storage.url(base + ".json"),
    }
    registry.write_json(storage, base + ".json", out)
    return out
