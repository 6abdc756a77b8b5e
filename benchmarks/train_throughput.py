"""Training throughput of one fold: resnet50 at 224 px, mixed precision, channels_last.

Writes ``benchmarks/results/train_<backbone>_<size>px_<device>.json`` with images/s (training
and validation passes, timed after a warm-up epoch), peak GPU memory and the device name.
Needs CUDA: on a CPU it says so and exits cleanly (status 0) without writing a result.

    python benchmarks/train_throughput.py [--backbone resnet50] [--image-size 224]
        [--images 2048] [--batch-size 128] [--epochs 2] [--compile]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_images(folder: Path, n: int, size: int, classes: int) -> tuple[list[str], list[int]]:
    """Random-noise JPEGs of ``size`` px: decoding and resizing cost as much as real photos."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        paths.append(str(path))
        labels.append(i % classes)
    return paths, labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=2048, help="training images (+1/4 validation)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="the first is a warm-up, not timed")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: the training benchmark needs one; nothing measured")
        return 0
    from darkroom.config import TrainConfig
    from darkroom.training.fit import fit
    from darkroom.training.recipe import amp_dtype
    from darkroom.training.records import FoldData

    device = torch.device("cuda")
    cfg = TrainConfig(
        backbone=a.backbone,
        pretrained=False,  # random-noise images; nothing to download on the GPU machine
        image_size=a.image_size,
        batch_size=a.batch_size,
        epochs=a.epochs,
        lr=1e-3,
        lr_min=1e-5,
        augment="soft",
        folds=5,
        mixed_precision="auto",
        channels_last=True,
        compile=a.compile,
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths, labels = write_images(Path(tmp), a.images + a.images // 4, a.image_size, 10)
        n_train = a.images
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        data = FoldData(paths[:n_train], labels[:n_train], paths[n_train:], labels[n_train:], 10)
        result = fit(
            data,
            cfg,
            device=device,
            num_workers=a.workers,
        )
        total = time.perf_counter() - t0
    timed = result.history[1:] or result.history  # epoch 0 pays for cudnn autotune, compile
    seconds = sum(h["seconds"] for h in timed)
    images = (n_train + len(paths) - n_train) * len(timed)
    out = {
        "benchmark": "train_one_fold",
        "backbone": a.backbone,
        "image_size": a.image_size,
        "batch_size": result.batch_size,
        "mixed_precision": str(amp_dtype(cfg, device)),
        "channels_last": True,
        "compile": a.compile,
        "train_images": n_train,
        "val_images": len(paths) - n_train,
        "epochs": a.epochs,
        "timed_epochs": len(timed),
        "images_per_s": images / seconds,
        "train_images_per_s": n_train * len(timed) / seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device": torch.cuda.get_device_name(0),
        "dataloader_workers": a.workers,
        "total_seconds": total,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "at": datetime.now(UTC).isoformat(),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    name = out["device"].lower().replace(" ", "-")
    path = a.out / f"train_{a.backbone}_{a.image_size}px_{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
