"""Training input throughput: the decode-once cache against decoding every epoch.

Measured side by side in one run, on synthetic 1024x768 photos (gradients, shapes and noise,
JPEG quality 90) written once to a temporary folder:

- ``p3_cached_vs_decode``: the training item path on one core at 224 px with the soft
  augmentation, cached pixels (entry read + augmentation) over the file path (decode at reduced
  scale, resize, augmentation, normalisation).
- ``p1_train_efficiency``: a training epoch of mobilenetv3_small_100 at 96 px on the CPU
  through ``Trainer.run_epoch`` over the cache (``num_workers="auto"``), over the same steps
  on synthetic tensors already on the device (same model, batch and precision).
- ``p1_vs_tutorial_loop``: that epoch over the tutorials' loop on the same photos (OpenCV
  decode of the whole file, Resize, augmentation, Normalize, ToTensorV2 every epoch, no
  workers).
- ``p6_rss_10k_over_1k``: peak RSS of a one-epoch fit over 10,000 cached images over that of
  1,000, each in a process of its own.

On CUDA it adds resnet50 at 224 px in bf16: the epoch over the cache and the synthetic steps.

    python benchmarks/bench_train.py [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from darkroom.config import TrainConfig
from darkroom.data.cache import DecodedCache
from darkroom.data.images import ImageDataset, build_transform
from darkroom.training.feed import DecodedImages, close_loaders, resolve_workers
from darkroom.training.records import FoldData
from darkroom.training.steps import train_one_epoch
from darkroom.training.trainer import Trainer

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLASSES = 10
CPU = torch.device("cpu")


def write_photos(folder: Path, n: int, w: int = 1024, h: int = 768) -> list[str]:
    """``n`` distinct photos with real structure: a gradient, a few shapes, sensor-like noise."""
    rng, paths = np.random.default_rng(0), []
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        img = np.stack([x / w * 255 * a, y / h * 255 * b, (x + y) / (w + h) * 255 * c], -1)
        img = img.astype(np.uint8)
        for _ in range(4):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.circle(img, centre, int(rng.integers(20, h // 3)), colour, -1)
            cv2.rectangle(img, centre, (centre[0] + 150, centre[1] + 90), colour[::-1], 5)
        img = cv2.add(img, rng.normal(0, 6, img.shape).astype(np.int8), dtype=cv2.CV_8U)
        path = folder / f"photo-{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    return paths


def _ids(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def best_rates(runs: dict, rounds: int, device: torch.device = CPU) -> dict:
    """Images/s of each ``name: (fn, images)``, the best of ``rounds`` timed calls taken in
    turn (A, B, A, B...) after one untimed call each (workers start, allocators and cuDNN
    settle): on a shared, loaded machine the ratios then compare like with like."""
    best = dict.fromkeys(runs, 0.0)
    for r in range(rounds + 1):
        for name, (fn, images) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                best[name] = max(best[name], images / (time.perf_counter() - t0))
    return best


def item_rates(paths: list[str], root: Path, rounds: int, side: int = 224) -> dict:
    """Images/s of one core: the file path, the cached path, and the cache's build."""
    cv2.setNumThreads(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        cache = DecodedCache(root / f"item-{side}", side, 10**12)
        entries = cache.build(_ids(len(paths)), paths, threads=1).entries
        build = len(paths) / (time.perf_counter() - t0)
        files = ImageDataset(paths, [0] * len(paths), build_transform(side, MEAN, STD, "soft"))
        cached, items = DecodedImages(), [(e, 0, "soft") for e in entries]
        runs = {
            "file_item_img_s": (lambda: [files[i] for i in range(len(paths))], len(paths)),
            "cached_item_img_s": (lambda: [cached[item] for item in items], len(items)),
        }
        rates = best_rates(runs, rounds)
    finally:
        cv2.setNumThreads(-1)
        torch.set_num_threads(threads)
    return {**rates, "build_img_s": build}


class TutorialDataset(torch.utils.data.Dataset):
    """The tutorials' dataset: OpenCV reads the whole file, BGR to RGB, one albumentations
    Compose (Resize, augmentation, Normalize, ToTensorV2), every epoch."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        image = cv2.cvtColor(cv2.imread(self.paths[i]), cv2.COLOR_BGR2RGB)
        return self.transform(image=image)["image"], torch.tensor(self.labels[i])


def epoch_rates(
    cfg: TrainConfig, entries, paths, device, rounds: int, workers="auto", others=("tutorial",)
) -> dict:
    """Training images/s of an epoch over the cache (``Trainer.run_epoch``) and, as
    ``others`` asks, of the same steps on synthetic tensors already on the device and of the
    tutorials' loop over ``paths``; one model for all."""
    labels = [i % CLASSES for i in range(len(entries))]
    data = FoldData(entries, labels, [], [], CLASSES, decoded=True)
    trainer = Trainer.build(data, cfg, device, workers, cfg.batch_size, 1)
    epoch, n = iter(range(1000)), len(trainer.train_loader) * cfg.batch_size
    runs = {"epoch_img_s": (lambda: trainer.run_epoch(next(epoch)), min(len(entries), n))}
    side, g = cfg.image_size, torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(cfg.batch_size, 3, side, side, generator=g).to(device),
            torch.randint(0, CLASSES, (cfg.batch_size,), generator=g).to(device),
        )
        for _ in range(len(trainer.train_loader) if "synthetic" in others else 0)
    ]
    step = lambda loader: train_one_epoch(  # noqa: E731
        trainer.runner,
        loader,
        trainer.optimizer,
        trainer.scheduler,
        trainer.criterion,
        device,
        trainer.opts,
        trainer.scaler,
    )
    if "synthetic" in others:
        runs["synthetic_img_s"] = (lambda: step(batches), n)
    if "tutorial" in others:
        tf = build_transform(side, MEAN, STD, cfg.augment)
        dataset = TutorialDataset(paths, labels[: len(paths)], tf)
        loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, shuffle=True)
        runs["tutorial_img_s"] = (lambda: step(loader), len(paths))
    try:
        return best_rates(runs, rounds, device)
    finally:
        trainer.close()


RSS_CODE = """
import json, resource, sys
import torch
from darkroom.config import TrainConfig
from darkroom.training.fit import fit
from darkroom.training.records import FoldData
entries = json.loads(sys.stdin.read())
cfg = TrainConfig.model_validate_json(sys.argv[1])
labels = [i % 10 for i in range(len(entries))]
fit(FoldData(entries, labels, [], [], 10, decoded=True), cfg, device=torch.device("cpu"),
    num_workers="auto")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(cfg: TrainConfig, entries: list[str]) -> int:
    """Peak RSS in bytes of a one-epoch fit over ``entries`` in a fresh process."""
    src = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "src"), str(src)])}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RSS_CODE), cfg.model_dump_json()],
        input=json.dumps(entries),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(out.stdout.split()[-1])


def _cpu_config(side: int, batch: int, epochs: int = 1) -> TrainConfig:
    return TrainConfig(
        backbone="mobilenetv3_small_100",
        pretrained=False,
        image_size=side,
        batch_size=batch,
        epochs=epochs,
        lr=1e-3,
        augment="soft",
    )


def _cuda_part(root: Path, paths: list[str], n: int) -> dict:
    """resnet50 at 224 px in bf16 on the GPU: the epoch over the cache and synthetic steps."""
    cfg = TrainConfig(
        backbone="resnet50",
        pretrained=False,
        image_size=224,
        batch_size=128,
        lr=1e-3,
        augment="soft",
        mixed_precision="bf16",
        channels_last=True,
    )
    ids = _ids(n)
    entries = (
        DecodedCache(root / "gpu", 224, 10**12)
        .build(ids, [paths[i % len(paths)] for i in range(n)])
        .entries
    )
    rates = epoch_rates(cfg, entries, paths, torch.device("cuda"), 2, others=("synthetic",))
    return {
        "device": torch.cuda.get_device_name(0),
        "model": "resnet50",
        "image_size": 224,
        "batch_size": cfg.batch_size,
        "precision": "bf16",
        "images": n,
        "workers": resolve_workers("auto"),
        "epoch_img_s": rates["epoch_img_s"],
        "synthetic_img_s": rates["synthetic_img_s"],
        "efficiency": rates["epoch_img_s"] / rates["synthetic_img_s"],
    }


def run(quick: bool = False) -> dict:
    """Runs every measurement; returns the ratios and their details (JSON-able)."""
    photos, train_n, rss_n, rounds = (16, 64, 200, 1) if quick else (256, 512, 10_000, 3)
    side, batch = 96, 32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "photos").mkdir()
        paths = write_photos(root / "photos", photos)
        items = item_rates(paths, root, rounds)
        cfg, cpu = _cpu_config(side, batch), torch.device("cpu")
        src = [paths[i % len(paths)] for i in range(max(train_n, rss_n))]
        ids = _ids(len(src))
        cache = DecodedCache(root / "decoded", side, 10**12)
        entries = cache.build(ids, src).entries
        others = ("synthetic", "tutorial")
        rates = epoch_rates(cfg, entries[:train_n], src[:train_n], cpu, rounds, others=others)
        if not quick:  # what "auto" chose against one worker, on this machine's cores
            one = epoch_rates(cfg, entries[:train_n], [], cpu, rounds, workers=1, others=())
            rates["epoch_img_s_1_worker"] = one["epoch_img_s"]
        close_loaders()
        rss_big = peak_rss(cfg, entries[:rss_n])
        rss_small = peak_rss(cfg, entries[: rss_n // 10])
        gpu = _cuda_part(root, paths, 512 if quick else 4096) if torch.cuda.is_available() else None
    details = {
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "workers_auto": resolve_workers("auto"),
        "photos": f"{photos} distinct 1024x768 JPEGs, quality 90",
        "item_path": {"image_size": 224, "augment": "soft", "threads": 1, **items},
        "epoch": {
            "model": cfg.backbone,
            "image_size": side,
            "batch_size": batch,
            "precision": "fp32",
            "device": "cpu",
            "images": train_n,
            **rates,
            # What any input path could reach against the tutorials' loop: the model's own
            # rate over theirs (their decode runs between the steps, on the steps' cores).
            "ceiling_vs_tutorial_loop": rates["synthetic_img_s"] / rates["tutorial_img_s"],
        },
        "rss": {"images": [rss_n, rss_n // 10], "peak_bytes": [rss_big, rss_small]},
        "cuda": gpu,
    }
    return {
        "p1_train_efficiency": rates["epoch_img_s"] / rates["synthetic_img_s"],
        "p1_vs_tutorial_loop": rates["epoch_img_s"] / rates["tutorial_img_s"],
        "p3_cached_vs_decode": items["cached_item_img_s"] / items["file_item_img_s"],
        "p6_rss_10k_over_1k": rss_big / rss_small,
        "details": details,
    }


def _table(result: dict) -> str:
    d = result["details"]
    rows = [
        ("p3 cached / decode item path (224 px, 1 core)", result["p3_cached_vs_decode"]),
        ("   cached item img/s", d["item_path"]["cached_item_img_s"]),
        ("   file item img/s", d["item_path"]["file_item_img_s"]),
        ("p1 epoch / synthetic steps (96 px, CPU)", result["p1_train_efficiency"]),
        ("p1 epoch / tutorials' loop", result["p1_vs_tutorial_loop"]),
        ("   epoch img/s", d["epoch"]["epoch_img_s"]),
        ("   synthetic img/s", d["epoch"]["synthetic_img_s"]),
        ("   tutorials' loop img/s", d["epoch"]["tutorial_img_s"]),
        ("   ceiling: synthetic / tutorials' loop", d["epoch"]["ceiling_vs_tutorial_loop"]),
        ("p6 peak RSS 10x images / 1x", result["p6_rss_10k_over_1k"]),
    ]
    if d["cuda"]:
        rows += [
            (f"cuda {d['cuda']['device']} resnet50 epoch / synthetic", d["cuda"]["efficiency"])
        ]
    return "\n".join(f"{name:<50} {value:10.2f}" for name, value in rows)


if __name__ == "__main__":
    result = run(quick="--quick" in sys.argv)
    print(_table(result))
    print(json.dumps(result, indent=2))
