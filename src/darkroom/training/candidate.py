"""A candidate's final files once its folds are done: its weights (the best fold's, or the
refit's), model.json, timm's config.json, the out-of-fold predictions and metrics, and the
plots."""

from __future__ import annotations

import logging
import platform
from datetime import UTC, datetime

import numpy as np
import pandas as pd

import darkroom
from darkroom import layout
from darkroom.config import TrainConfig
from darkroom.data.images import UnreadableImage, decode_rgb
from darkroom.data.index import read_index
from darkroom.model import metrics as mx
from darkroom.model.backbone import create_model, hub_config, sha256
from darkroom.storage import Storage
from darkroom.training import auto_lr, plots
from darkroom.training.label_report import write_label_issues
from darkroom.training.records import CandidateReport, EpochRow, FoldSummary

log = logging.getLogger(__name__)


def finalize_candidate(
    storage: Storage, cfg: TrainConfig, snapshot: str, version: str, folds: list[FoldSummary]
) -> CandidateReport:
    """Writes the candidate's ``model.safetensors`` (the best fold's, or the refit's), model.json
    (with the fold members when ``final_model="ensemble"``), oof.parquet, oof_metrics.json and
    the plots."""
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
    meta.update(_how_trained(storage, cfg, version, source, folds))
    _write_timm_configs(storage, cfg, version, classes, best, folds)
    storage.write_json(layout.version(version, "model.json"), meta)
    cv, oof = _write_reports(storage, version, folds, classes, rows)
    issues = write_label_issues(storage, version, oof, classes)
    log.info(
        "%s: %d of %d training labels look wrong (estimated noise rate %.1f%%)",
        version,
        issues.count,
        issues.examined,
        100 * issues.noise_rate,
    )
    return CandidateReport(
        version=version,
        final_model=cfg.final_model,
        chosen_fold=best.fold,
        sha256=meta["sha256"],
        cv=cv,
        members=[m["key"] for m in meta.get("ensemble", [])],
        refit_epochs=meta.get("refit_epochs"),
        label_issues=issues,
    )


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


def _how_trained(
    storage: Storage, cfg: TrainConfig, version: str, source: FoldSummary, folds
) -> dict:
    """model.json's entries that depend on the recipe: the refit's epochs, the ensemble's
    members, and what ``lr: auto`` chose."""
    extra = {}
    if cfg.final_model == "refit":
        extra["refit_epochs"] = source.epochs_run
    if cfg.final_model == "ensemble":
        extra["ensemble"] = [{"key": layout.member(s.fold), "sha256": s.sha256} for s in folds]
    if (lr_choice := auto_lr.read_choice(storage, version)) is not None:
        extra["lr_choice"] = lr_choice.as_dict()
    return extra


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


def _write_reports(
    storage: Storage, version: str, folds: list[FoldSummary], classes, rows
) -> tuple[dict, pd.DataFrame]:
    """oof.parquet, oof_metrics.json and the plots of a candidate; returns the folds' mean and
    std of each metric, and the out-of-fold rows."""
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
        s.fold: [
            EpochRow.from_record(row)
            for row in storage.read_json(layout.fold(version, s.fold, "fold.json"))["history"]
        ]
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
    return cv, oof


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
