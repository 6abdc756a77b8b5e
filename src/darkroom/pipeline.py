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

import numpy as np
import pandas as pd

import darkroom
from darkroom import index as idx
from darkroom import metrics as mx
from darkroom import plots, registry
from darkroom.config import TrainConfig
from darkroom.model import resolve_device, sha256, to_bytes
from darkroom.storage import open_storage
from darkroom.sync import load_manifest, local_paths, sync_prefix
from darkroom.training import fit

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None] | None


# ---- sync and index -------------------------------------------------------------------------

def sync_labeled(storage_uri: str, cache_dir: str, concurrency: int = 16,
                 progress: Progress = None) -> dict:
    report, _ = sync_prefix(open_storage(storage_uri), idx.LABELED, cache_dir,
                            concurrency=concurrency, progress=progress)
    return report.as_dict()


def rebuild_index(storage_uri: str, cache_dir: str, folds: int, seed: int,
                  holdout_fraction: float, run_name: str = "", progress: Progress = None) -> dict:
    """Indexes the synced labeled images; writes the snapshot, the pointer and a quarantine
    report of unusable images. Returns the pointer plus a summary."""
    storage = open_storage(storage_uri)
    objects = load_manifest(Path(cache_dir), idx.LABELED)
    previous = None
    with contextlib.suppress(FileNotFoundError):
        previous, _, _ = idx.read_index(storage)
    df, classes = idx.build_index(objects, labels=idx.read_label_file(storage), folds=folds,
                                  seed=seed, holdout_fraction=holdout_fraction,
                                  previous=previous, progress=progress)
    pointer = idx.write_index(storage, df, classes, folds=folds, seed=seed,
                              holdout_fraction=holdout_fraction)
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


# ---- training -------------------------------------------------------------------------------

def train_fold(storage_uri: str, cache_dir: str, snapshot: str, fold: int, version: str,
               cfg: TrainConfig, device: str = "auto", num_workers: int = 0,
               on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Trains fold ``fold`` of ``snapshot``; writes ``models/<version>/folds/<fold>/``
    (model.safetensors, fold.json, oof.parquet). Returns a small summary, never the model."""
    storage = open_storage(storage_uri)
    df, classes, _ = idx.read_index(storage, snapshot)
    train_rows = df[(df["split"] == "train") & (df["fold"] != fold)]
    val_rows = df[(df["split"] == "train") & (df["fold"] == fold)]
    dev = resolve_device(device)
    t0 = time.perf_counter()
    result = fit(local_paths(storage, train_rows, cache_dir), train_rows["class_index"].tolist(),
                 local_paths(storage, val_rows, cache_dir), val_rows["class_index"].tolist(),
                 len(classes), cfg, device=dev, num_workers=num_workers, on_epoch=on_epoch)
    metrics = mx.classification_metrics(val_rows["class_index"].to_numpy(), result.val_probs,
                                        classes)
    prefix = registry.version_key(version, f"folds/{fold}/")
    weights = to_bytes(result.model)
    storage.write_bytes(prefix + "model.safetensors", weights)
    oof = val_rows[["image_id", "key", "label", "class_index"]].assign(
        fold=fold, pred_index=result.val_probs.argmax(1),
        confidence=result.val_probs.max(1), probs=list(result.val_probs))
    buf = io.BytesIO()
    oof.to_parquet(buf, index=False)
    storage.write_bytes(prefix + "oof.parquet", buf.getvalue())
    summary = {"fold": fold, "version": version, "best_epoch": result.best_epoch,
               "train_images": len(train_rows), "val_images": len(val_rows),
               "seconds": time.perf_counter() - t0, "device": str(dev),
               "weights": storage.url(prefix + "model.safetensors"), "sha256": sha256(weights),
               "mean": result.mean, "std": result.std,
               "metrics": {k: metrics[k] for k in ("accuracy", "f1_macro", "precision_macro",
                                                    "recall_macro", "log_loss", "top5_accuracy")
                           if k in metrics}}
    registry.write_json(storage, prefix + "fold.json",
                        {**summary, "history": result.history, "full_metrics": metrics})
    return summary


def finalize_candidate(storage_uri: str, version: str, snapshot: str, fold_summaries: list[dict],
                       cfg: TrainConfig) -> dict:
    """Copies the best fold's weights to ``models/<version>/`` with model.json, oof.parquet and
    plots. Returns model.json."""
    storage = open_storage(storage_uri)
    _, classes, _ = idx.read_index(storage, snapshot)
    best = max(fold_summaries, key=lambda s: (s["metrics"][cfg.metric], -s["fold"]))
    weights = storage.read_bytes(registry.version_key(version, f"folds/{best['fold']}/"
                                                      "model.safetensors"))
    storage.write_bytes(registry.version_key(version, "model.safetensors"), weights)
    meta = {"version": version, "backbone": cfg.backbone, "classes": classes,
            "image_size": cfg.image_size, "mean": best["mean"], "std": best["std"],
            "train_config": cfg.model_dump(mode="json"), "index_snapshot": snapshot,
            "chosen_fold": best["fold"], "selection_metric": cfg.metric,
            "sha256": sha256(weights), "code_version": darkroom.__version__,
            "seed": cfg.seed, "created_at": datetime.now(UTC).isoformat(),
            "python": platform.python_version()}
    registry.write_json(storage, registry.version_key(version, "model.json"), meta)
    oof = pd.concat([pd.read_parquet(io.BytesIO(storage.read_bytes(
        registry.version_key(version, f"folds/{s['fold']}/oof.parquet"))))
        for s in fold_summaries], ignore_index=True)
    buf = io.BytesIO()
    oof.to_parquet(buf, index=False)
    storage.write_bytes(registry.version_key(version, "oof.parquet"), buf.getvalue())
    histories = {s["fold"]: json.loads(storage.read_text(registry.version_key(
        version, f"folds/{s['fold']}/fold.json")))["history"] for s in fold_summaries}
    storage.write_bytes(registry.version_key(version, "curves.png"), plots.curves_png(histories))
    oof_metrics = mx.classification_metrics(oof["class_index"].to_numpy(),
                                            np.stack(oof["probs"].to_numpy()), classes)
    storage.write_bytes(registry.version_key(version, "confusion.png"),
                        plots.confusion_png(oof_metrics["confusion_matrix"], classes,
                                            "out-of-fold confusion matrix"))
    return meta
