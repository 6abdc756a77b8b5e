"""Shared fixtures: real image files (scikit-learn's digits as PNG) in a real storage root."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from darkroom.cli.demo import DEMO_TRAIN, digit_png
from darkroom.config import TrainConfig
from darkroom.storage import LocalStorage, Storage

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# Small and fast on a 2-core CPU: timm's tiny test model at 32 px.
TINY = DEMO_TRAIN.model_copy(
    update={"backbone": "test_resnet", "batch_size": 32, "epochs": 1, "folds": 2}
)
# TINY learns little in one epoch (a coin toss on a 6-image holdout), which the promotion gate
# rightly refuses as a first champion; tests that need a champion train this one.
LEARNS = TINY.model_copy(update={"epochs": 5, "batch_size": 4})


# The DESIGN contracts as the tests state them (independently of the code's own constants).
PREDICTION_COLUMNS = [
    "key", "etag", "label", "confidence", "low_confidence", "topk_labels", "topk_probs",
    "model_version", "scored_at", "status", "error",
]  # fmt: skip
INDEX_COLUMNS = [
    "image_id", "key", "label", "class_index", "split", "fold", "width", "height", "channels",
    "format", "bytes", "etag", "status", "error",
]  # fmt: skip


def write_digits(
    storage: Storage,
    classes=("0", "1", "2"),
    per_class: int = 12,
    incoming: int = 0,
    offset: int = 0,
    size: int = 32,
) -> dict[str, str]:
    """Writes real digit images as labeled/<digit>/d-<i>.png (+ unlabeled ones under incoming/).

    Returns key -> true label for every image written.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    written: dict[str, str] = {}
    counts = dict.fromkeys(classes, 0)
    for i in range(offset, len(digits.target)):
        label = str(digits.target[i])
        if label not in counts or counts[label] >= per_class:
            continue
        counts[label] += 1
        key = f"labeled/{label}/d-{i:04d}.png"
        storage.put_source_object(key, digit_png(digits.data[i], size))
        written[key] = label
        if all(c >= per_class for c in counts.values()):
            break
    for j, i in enumerate(range(len(digits.target) - 1, -1, -1)):
        if j >= incoming:
            break
        key = f"incoming/new-{i:04d}.png"
        storage.put_source_object(key, digit_png(digits.data[i], size))
        written[key] = str(digits.target[i])
    return written


def png_bytes(value: int = 128, size: int = 16, channels: int = 3) -> bytes:
    img = np.full((size, size, channels) if channels > 1 else (size, size), value, np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.fixture
def local_storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "bucket")


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def train_candidate(storage: Storage, cache_dir, train: TrainConfig = TINY) -> str:
    """A model version through the core stages alone (no Prefect): sync, index, every fold,
    finalise. Returns the version; nothing is promoted."""
    from darkroom.config import RetrainConfig
    from darkroom.data.index import rebuild_index
    from darkroom.data.sync import sync_labeled
    from darkroom.registry import pointer
    from darkroom.training.fold import finalize_candidate, train_fold

    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache_dir), device="cpu", train=train)
    sync_labeled(storage, config)
    snap = rebuild_index(storage, config, "test").snapshot
    version = pointer.new_version(snap, train.fingerprint())
    folds = [train_fold(storage, config, snap, version, k) for k in range(train.folds)]
    finalize_candidate(storage, train, snap, version, folds)
    return version


def finished_task_runs(
    api: str, flow_run_id: str, prefix: str, count: int, timeout: float = 120.0
) -> list[dict]:
    """The flow run's task runs named ``prefix...``, by name, once ``count`` of them have ended.

    The server records task runs from the events their workers send, a moment after the flow
    has its results (later on a loaded machine), so this asks again until they are all there.
    """
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        runs = (
            httpx.post(
                f"{api}/task_runs/filter",
                json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200},
                timeout=30,
            )
            .raise_for_status()
            .json()
        )
        runs = sorted((r for r in runs if r["name"].startswith(prefix)), key=lambda r: r["name"])
        if sum(r["end_time"] is not None for r in runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)
