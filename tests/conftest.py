"""Shared fixtures: real image files (scikit-learn's digits as PNG) in a real storage root."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

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


def train_flags(recipe: TrainConfig = LEARNS, **update) -> list[str]:
    """A recipe as ``darkroom retrain`` flags (no download: --no-pretrained)."""
    r = recipe.model_copy(update=update)
    return [
        *("--backbone", r.backbone, "--no-pretrained", "--image-size", str(r.image_size)),
        *("--folds", str(r.folds), "--epochs", str(r.epochs), "--batch-size", str(r.batch_size)),
        *("--lr", str(r.lr), "--lr-min", str(r.lr_min), "--augment", r.augment),
    ]


# The DESIGN contracts as the tests state them (independently of the code's own constants).
PREDICTION_COLUMNS = [
    "key", "etag", "label", "confidence", "low_confidence", "topk_labels", "topk_probs",
    "model_version", "scored_at", "status", "error", "unfamiliar", "knn_distance", "embedding",
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
    from darkroom.training.candidate import finalize_candidate
    from darkroom.training.fold import train_fold

    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache_dir), device="cpu", train=train)
    sync_labeled(storage, config)
    snap = rebuild_index(storage, config, "test").snapshot
    version = pointer.new_version(snap, train.fingerprint())
    folds = [train_fold(storage, config, snap, version, k) for k in range(train.folds)]
    finalize_candidate(storage, train, snap, version, folds)
    return version


REPO = Path(__file__).resolve().parents[1]
# Set in a caller's shell, these would point a test's darkroom process elsewhere.
CALLERS_SETTINGS = ("PREFECT_API_URL", "PREFECT_PROFILE", "DARKROOM_STORAGE", "DARKROOM_CACHE")


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``darkroom`` process of a test's own: a Prefect home in
    ``tmp_path`` (each command starts its own temporary server), none of the caller's server,
    profile, storage root or cache, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CALLERS_SETTINGS}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a busy CI machine
        "PYTHONUNBUFFERED": "1",
    }
    return env | extra


def run_darkroom(*args: str, env: dict[str, str], timeout: int = 600, ok=(0,)):
    """``python -m darkroom.cli ARGS`` from the repository root; fails the test, with the
    command's output, when it exits with a status not in ``ok``."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "darkroom.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode in ok, (
        f"darkroom {' '.join(args)} exited {done.returncode}\n--- stdout\n{done.stdout}"
        f"\n--- stderr\n{done.stderr[-6000:]}"
    )
    return done


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


# ---- photos of several sizes and formats (the decode-once cache and its feed) ----------------


def photo(path: Path, w: int, h: int, seed: int, ext: str = ".jpg") -> tuple[str, str]:
    """A structured image (gradient, a disc, noise); returns (its content hash, its path)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.uint8)
    cv2.circle(
        img, (w // 3, h // 2), min(w, h) // 4, tuple(int(c) for c in rng.integers(0, 255, 3)), -1
    )
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path.with_suffix(ext)), img)
    data = path.with_suffix(ext).read_bytes()
    return hashlib.sha256(data).hexdigest(), str(path.with_suffix(ext))


@pytest.fixture
def photos(tmp_path):
    """Three JPEGs (one large enough for a reduced-scale decode) and a PNG."""
    sizes = [(640, 480), (200, 150), (96, 128)]
    out = [photo(tmp_path / f"p{i}", w, h, i) for i, (w, h) in enumerate(sizes)]
    out.append(photo(tmp_path / "p3", 90, 60, 3, ".png"))
    ids, paths = zip(*out, strict=True)
    return list(ids), list(paths)


def entries_on_disk(root: Path) -> list[Path]:
    return sorted(root.glob("v*/*/*/*.npy"))


# ---- data, model, scoring and storage tests (tests/unit/{data,scoring,storage}, tests/e2e) ----


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def huge_png(path, width: int = 30000, height: int = 30000) -> None:
    """A black 8-bit grey PNG, compressed one scanline at a time: the file is under 1 MB and
    writing it needs one row of memory (decoding it would need width x height bytes)."""
    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr))
        for _ in range(height):
            if data := z.compress(row):
                f.write(_png_chunk(b"IDAT", data))
        f.write(_png_chunk(b"IDAT", z.flush()) + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    huge_png(path)
    assert path.stat().st_size < 1_000_000
    return path


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny timm test model for the classes "0", "1", "2", untrained, and its model.json."""
    import torch

    from darkroom.model.backbone import create_model, mean_std

    torch.manual_seed(0)
    model = create_model(TINY, 3, pretrained=False).eval()
    mean, std = mean_std(model)
    meta = {
        "classes": ["0", "1", "2"],
        "image_size": TINY.image_size,
        "mean": mean,
        "std": std,
        "train_config": TINY.model_dump(mode="json"),
    }
    return model, meta


def plant_lease(storage, name: str, host: str, pid: int, seconds: float) -> None:
    """A lease as another run would have left it."""
    now = datetime.now(UTC)
    storage.write_json(
        f"leases/{name}.json",
        {
            "name": name,
            "holder": {"host": host, "pid": pid},
            "acquired_at": now.isoformat(),
            "expires_at": (now + timedelta(seconds=seconds)).isoformat(),
        },
    )
