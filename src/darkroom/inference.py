"""Running a saved model version on image files: load it once per process (checking its
weights' sha256), predict class probabilities. No storage listing, no Prefect."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from darkroom import layout
from darkroom.config import TrainConfig
from darkroom.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    SafeImageDataset,
    build_transform,
    worker_context,
)
from darkroom.model import create_model, load_weights, resolve_device
from darkroom.storage import Storage


@dataclass
class Predictions:
    """What a model made of a list of files, in order.

    Attributes:
        probs: class probabilities (zeros where a file was refused).
        ok: True where the file was used.
        status: "ok", or why the file was refused: "too_large" (over the pixel limit, from
            its header) or "unreadable".
        errors: the refusal's reason ("" where ok).
    """

    probs: np.ndarray
    ok: np.ndarray
    status: list[str]
    errors: list[str]


@dataclass
class LoadedModel:
    """A model version ready to predict: one network, or the fold ensemble of an ensemble
    version (probabilities averaged over members and, with TTA, over flipped views)."""

    version: str
    meta: dict
    model: torch.nn.Module
    device: torch.device
    extra_members: list[torch.nn.Module] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def members(self) -> list[torch.nn.Module]:
        return [self.model, *self.extra_members]

    @torch.no_grad()
    def predict(
        self,
        paths: Sequence[str],
        batch_size: int = 64,
        num_workers: int = 0,
        tta: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> Predictions:
        """Class probabilities for ``paths`` (in order), and why any file was refused.

        Args:
            tta: also score the horizontal flip of each image and average the views.
            max_pixels: images with more pixels are refused from their header, undecoded.
        """
        size = self.meta["image_size"]
        tf = build_transform(size, self.meta["mean"], self.meta["std"], "none")
        ds = SafeImageDataset(paths, tf, size, max_pixels=max_pixels)
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=num_workers,
            multiprocessing_context=worker_context(num_workers),
        )
        probs = np.zeros((len(paths), len(self.classes)), np.float32)
        ok = np.zeros(len(paths), bool)
        for m in self.members:
            m.eval()
        for images, idx, good in loader:
            images = images.to(self.device, non_blocking=True)
            views = [images, images.flip(-1)] if tta else [images]
            p = torch.stack(
                [torch.softmax(m(v).float(), 1) for m in self.members for v in views]
            ).mean(0)
            probs[idx.numpy()] = p.cpu().numpy()
            ok[idx.numpy()] = good.numpy()
        status, errors = ["ok"] * len(paths), [""] * len(paths)
        for i in np.flatnonzero(~ok):
            status[i], errors[i] = ds.refusal(int(i))
        return Predictions(probs, ok, status, errors)

    def predict_proba(self, paths: Sequence[str], **options) -> tuple[np.ndarray, np.ndarray]:
        """``predict``'s class probabilities and mask of usable files (same options)."""
        p = self.predict(paths, **options)
        return p.probs, p.ok


_LOADED: dict[tuple, LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def _load_net(
    storage: Storage, cfg: TrainConfig, n_classes: int, key: str, sha: str | None, dev: torch.device
) -> torch.nn.Module:
    model = create_model(cfg, n_classes, pretrained=False)
    load_weights(model, storage.read_bytes(key), sha)
    return model.to(dev).eval()


def load_version(storage: Storage, version: str, device: str = "auto") -> LoadedModel:
    """Loads a model version once per process (later calls reuse it), checking every weights
    file against the sha256 recorded in model.json."""
    dev = resolve_device(device)
    meta = storage.read_json(layout.version(version, "model.json"))
    # The weights' hash is in the key: a rewritten version is never served from a stale copy.
    cache_key = (storage.uri, version, meta.get("sha256"), str(dev))
    with _LOAD_LOCK:  # chunk tasks in threads share one copy
        if cache_key not in _LOADED:
            cfg = TrainConfig(**meta["train_config"])
            n = len(meta["classes"])
            members = [
                (layout.version(version, m["key"]), m["sha256"]) for m in meta.get("ensemble") or []
            ]
            if not members:
                members = [(layout.version(version, "model.safetensors"), meta.get("sha256"))]
            nets = [_load_net(storage, cfg, n, k, sha, dev) for k, sha in members]
            _LOADED[cache_key] = LoadedModel(version, meta, nets[0], dev, nets[1:])
        return _LOADED[cache_key]


def align_probs(probs: np.ndarray, model_classes: list[str], classes: list[str]) -> np.ndarray:
    """Maps a model's class columns onto ``classes`` (a class the model lacks gets 0)."""
    out = np.zeros((len(probs), len(classes)), np.float32)
    pos = {c: i for i, c in enumerate(model_classes)}
    for j, c in enumerate(classes):
        if c in pos:
            out[:, j] = probs[:, pos[c]]
    return out
