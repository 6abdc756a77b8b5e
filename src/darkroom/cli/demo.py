"""The demo dataset: scikit-learn's 1,797 real handwritten digits, upscaled and written as PNG.

About 80% go under ``labeled/<digit>/`` and 20%, without labels, under ``incoming/``; their
true labels are kept aside in ``demo/incoming_truth.csv`` so the demo can measure itself.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from darkroom import layout
from darkroom.config import TrainConfig
from darkroom.storage import Storage

# Digits from scratch (no weights can be downloaded here) want a higher lr than the tutorials'
# 1e-4 fine-tuning rate, and must not be mirrored.
DEMO_TRAIN = TrainConfig(
    backbone="resnet18",
    pretrained=False,
    image_size=32,
    batch_size=64,
    epochs=8,
    lr=2e-3,
    lr_min=1e-5,
    folds=5,
    augment="none",
)


def digit_png(pixels: np.ndarray, size: int) -> bytes:
    img = (pixels.reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def write_demo_data(
    storage: Storage,
    *,
    size: int = 32,
    incoming_fraction: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Writes the digits; existing objects are left as they are. Returns counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    rng = np.random.default_rng(seed)
    incoming = rng.random(n) < incoming_fraction
    truth = []
    for i in range(n):
        label = str(digits.target[i])
        data = digit_png(digits.data[i], size)
        if incoming[i]:
            key = f"{layout.INCOMING}digit-{i:04d}.png"
            truth.append((key, label))
        else:
            key = f"{layout.LABELED}{label}/digit-{i:04d}.png"
        storage.put_source_object(key, data)
    storage.write_csv(layout.DEMO_TRUTH, pd.DataFrame(truth, columns=["key", "label"]))
    return {"labeled": int((~incoming).sum()), "incoming": int(incoming.sum())}


def has_demo_data(storage: Storage) -> bool:
    return storage.exists(layout.DEMO_TRUTH)


def truth_accuracy(storage: Storage, predictions: pd.DataFrame) -> tuple[float, int]:
    """Accuracy of ``predictions`` on the incoming digits, against the kept-aside labels."""
    truth = storage.read_csv(layout.DEMO_TRUTH, dtype=str)
    merged = truth.merge(predictions[["key", "label"]], on="key", suffixes=("_true", "_pred"))
    if merged.empty:
        return 0.0, 0
    return float((merged["label_true"] == merged["label_pred"]).mean()), len(merged)


def report(storage: Storage, retrain: dict, scored: dict) -> str:
    """What `darkroom demo` prints: sync, retrain and scoring figures of the champion."""
    from darkroom.registry import pointer as registry
    from darkroom.registry.evaluation import read_metrics
    from darkroom.scoring.chunks import read_predictions

    champion, _ = registry.read_champion(storage)
    v = champion.version
    metrics = read_metrics(storage, v)
    preds = read_predictions(storage, v)
    acc, n = truth_accuracy(storage, preds)
    sync, cv, holdout = retrain["sync"], metrics.cv["accuracy"], metrics.holdout
    verdict = "promoted" if retrain.get("promoted") else "rejected"
    trained = (
        "skipped, nothing changed since the champion"
        if retrain["skipped"]
        else f"trained {retrain['version']}, {verdict}"
    )
    return "\n".join(
        [
            "\n==== darkroom demo ====",
            f"sync labeled/: listed {sync['listed']}, new {sync['new']}, changed "
            f"{sync['changed']}, unchanged {sync['unchanged']}, downloaded "
            f"{sync['downloaded_bytes']} bytes",
            f"retrain: {trained}",
            f"champion: {v}",
            f"CV accuracy ({len(metrics.folds)} folds): {cv['mean']:.4f} ± {cv['std']:.4f}",
            f"holdout accuracy: {holdout['accuracy']:.4f} ({holdout['n']} images)",
            f"scoring: {scored['incoming']} incoming, {scored['already_scored']} already scored, "
            f"{scored['scored']} scored now, {scored['failed']} failed",
            f"predictions for {v}: {len(preds)} rows; accuracy vs kept-aside labels: {acc:.4f} "
            f"({n} images)",
            _drift_line(scored.get("drift")),
            f"model files: {storage.url(layout.version(v))}",
            f"predictions: {storage.url(layout.predictions(v))}",
            f"champion pointer: {storage.url(layout.CHAMPION)}",
        ]
    )


def _drift_line(drift: dict | None) -> str:
    """The scoring run's drift verdict (none when nothing was scored)."""
    if not drift:
        return "drift: no report (nothing scored this run)"
    expected = drift["expected_accuracy"]
    shown = "unknown" if expected is None else f"{expected:.4f}"
    return (
        f"drift: {drift['verdict']}, {100 * drift['unfamiliar_share']:.1f}% unfamiliar, "
        f"expected accuracy {shown} (report: {drift['url']})"
    )
