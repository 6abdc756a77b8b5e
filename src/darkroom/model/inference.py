"""Running a saved model version on image files: load it once per process (checking its
weights' sha256), predict class probabilities. No storage listing, no Prefect.

Scoring runs at the model's speed: ``inference_mode``; images decoded and squashed to the model's
size by evaluation's own ``SafeImageDataset`` and kept uint8, then normalised a whole batch at a
time on the device (``build_transform``'s numbers to the bit, without its per-image float work);
on CUDA bf16 autocast, channels_last and the next batches decoded while the GPU runs this one; a
CPU runs fp32 as evaluation does (``RUN_MODES``, a table by device type).
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from darkroom import layout
from darkroom.config import TrainConfig
from darkroom.data.cache import resize_square
from darkroom.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    SafeImageDataset,
    normalise_uint8,
    uint8_affine,
    worker_context,
)
from darkroom.model.backbone import create_model, load_weights, resolve_device
from darkroom.ops import stopping
from darkroom.storage import Storage


@dataclass(frozen=True)
class RunMode:
    """How a device runs the model: autocast dtype (None: fp32), the memory format of the
    weights and batches, whether batches are pinned for an asynchronous copy, and how many
    batches a background thread decodes ahead of the model (0: decode, then run, in turn)."""

    autocast: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    pin_memory: bool = False
    prefetch: int = 0


# Device type -> RunMode. CUDA: bf16 (tensor cores, fp32's range; softmax stays fp32),
# channels_last (cuDNN's own layout for convolutions), and the host decodes the next batches
# while the GPU runs this one. Any other device: RunMode(), fp32 in the stored layout (the
# numbers evaluation computed), decoding in turn: the model already keeps every core busy,
# and a decoding thread beside it was slower on a 2-core machine (benchmarks/bench_score.py).
RUN_MODES: dict[str, RunMode] = {
    "cuda": RunMode(torch.bfloat16, torch.channels_last, pin_memory=True, prefetch=2)
}


def run_mode(device: torch.device) -> RunMode:
    return RUN_MODES.get(device.type, RunMode())


@dataclass
class Predictions:
    """What a model made of a list of files, in order.

    Attributes:
        probs: class probabilities (zeros where a file was refused).
        ok: True where the file was used.
        status: "ok", or why the file was refused: "too_large" (over the pixel limit, from
            its header) or "unreadable".
        errors: the refusal's reason ("" where ok).
        embeddings: with ``embed``, each image's penultimate-layer embedding (timm's
            ``forward_head(pre_logits=True)``; zeros where refused), else None.
    """

    probs: np.ndarray
    ok: np.ndarray
    status: list[str]
    errors: list[str]
    embeddings: np.ndarray | None = None


class _Squash:
    """``build_transform``'s leading Resize alone, uint8 HWC in and out; its Normalize and
    ToTensorV2 run on the whole batch, on the device (``LoadedModel.forward``)."""

    def __init__(self, side: int):
        self.side = side

    def __call__(self, *, image: np.ndarray) -> dict:
        return {"image": torch.from_numpy(np.ascontiguousarray(resize_square(image, self.side)))}


def scoring_images(paths: Sequence[str], size: int, max_pixels: int) -> SafeImageDataset:
    """Evaluation's dataset over ``paths`` yielding uint8 ``size x size x 3`` pixels (a refused
    file: black pixels, flagged not ok)."""
    ds = SafeImageDataset(paths, _Squash(size), size, max_pixels=max_pixels)
    ds.blank = torch.zeros(size, size, 3, dtype=torch.uint8)
    return ds


Batch = tuple[torch.Tensor, np.ndarray, np.ndarray]  # images, item indices, usable flags


def _collate(ds: SafeImageDataset, span: range, pin: bool) -> Batch:
    items = [ds[i] for i in span]
    images = torch.stack([image for image, _, _ in items])
    good = np.array([g for _, _, g in items], bool)
    return (images.pin_memory() if pin else images), np.arange(span.start, span.stop), good


def _ahead(make: Callable, jobs: Iterable, depth: int) -> Iterator:
    """``make(job)`` for each job, in order, computed ``depth`` jobs ahead by one background
    thread (decoding releases the GIL in OpenCV, so it runs beside the model)."""
    with ThreadPoolExecutor(1, thread_name_prefix="darkroom-decode") as pool:
        pending: deque = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(make, job))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early leaves no decoding behind
            for f in pending:
                f.cancel()


def decoded_batches(
    ds: SafeImageDataset,
    batch_size: int,
    num_workers: int = 0,
    prefetch: int = 0,
    pin: bool = False,
) -> Iterator[Batch]:
    """``ds`` in batches, in order: with ``num_workers``, from a DataLoader's worker
    processes; else ``prefetch`` batches decoded ahead by a background thread (0: in the
    calling thread, nothing overlapped)."""
    if num_workers:
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=num_workers,
            multiprocessing_context=worker_context(num_workers),
            pin_memory=pin,
        )
        return ((x, i.numpy(), g.numpy()) for x, i, g in loader)
    spans = (range(i, min(i + batch_size, len(ds))) for i in range(0, len(ds), batch_size))
    make = functools.partial(_collate, ds, pin=pin)
    return _ahead(make, spans, prefetch) if prefetch else map(make, spans)


@dataclass
class LoadedModel:
    """A model version ready to predict: one network, or the fold ensemble of an ensemble
    version (probabilities averaged over members and, with TTA, over flipped views)."""

    version: str
    meta: dict
    model: torch.nn.Module
    device: torch.device
    extra_members: list[torch.nn.Module] = field(default_factory=list)

    def __post_init__(self):
        fmt = run_mode(self.device).memory_format
        for m in self.members:
            m.to(memory_format=fmt).eval()

    @functools.cached_property
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return uint8_affine(self.meta["mean"], self.meta["std"], self.device)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def members(self) -> list[torch.nn.Module]:
        return [self.model, *self.extra_members]

    @property
    def temperature(self) -> float:
        """The version's temperature (model.json's calibration; 1 for versions without one)."""
        return temperature_of(self.meta)

    @torch.inference_mode()
    def forward(
        self, images: torch.Tensor, tta: bool = False, calibrated: bool = True, embed: bool = False
    ):
        """Class probabilities (fp32, on the device) of a batch: NHWC uint8 pixels at the
        model's size (normalised here), or tensors already normalised as ``build_transform``
        makes them. ``calibrated``: divided by the version's temperature (for one network
        without TTA, exactly the softmax of its logits over T). ``embed``: returns
        (probabilities, embeddings), the embeddings from the same pass (the first member's,
        unflipped view: what the version's reference was made from)."""
        mode = run_mode(self.device)
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # NHWC pixels from scoring_images
            images = normalise_uint8(images, self._affine)
        images = images.contiguous(memory_format=mode.memory_format)
        views = [images, images.flip(-1)] if tta else [images]
        with torch.autocast(self.device.type, mode.autocast, enabled=mode.autocast is not None):
            (first, image), *rest = [(m, v) for m in self.members for v in views]
            emb, head = embedded(first, image) if embed else (None, first(image))
            p = [torch.softmax(out.float(), 1) for out in [head, *(m(v) for m, v in rest)]]
        mean, t = torch.stack(p).mean(0), self.temperature if calibrated else 1.0
        probs = mean if t == 1.0 else torch.softmax(torch.log(mean.clamp_min(1e-12)) / t, 1)
        return (probs, emb.float()) if embed else probs

    def predict(
        self,
        paths: Sequence[str],
        batch_size: int = 64,
        num_workers: int = 0,
        tta: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        prefetch: int | None = None,
        calibrated: bool = True,
        embed: bool = False,
    ) -> Predictions:
        """Class probabilities for ``paths`` (in order), and why any file was refused.

        Args:
            num_workers: DataLoader worker processes decoding; 0: a background thread.
            tta: also score the horizontal flip of each image and average the views.
            max_pixels: images with more pixels are refused from their header, undecoded.
            prefetch: batches a thread decodes ahead (0: decode, then run, in turn);
                None: the device's ``RunMode.prefetch``.
            calibrated: apply the version's temperature (False: the raw probabilities).
            embed: also keep each image's embedding from the same forward pass.
        """
        size = self.meta["image_size"]
        ds = scoring_images(paths, size, max_pixels)
        probs = np.zeros((len(paths), len(self.classes)), np.float32)
        ok = np.zeros(len(paths), bool)
        mode = run_mode(self.device)
        prefetch = mode.prefetch if prefetch is None else prefetch
        batches = decoded_batches(ds, batch_size, num_workers, prefetch, mode.pin_memory)
        emb = None
        for images, idx, good in batches:
            stopping.check()
            out = self.forward(images, tta, calibrated, embed)
            if embed:
                out, e = out
                if emb is None:
                    emb = np.zeros((len(paths), e.shape[1]), np.float32)
                emb[idx] = e.cpu().numpy()
            probs[idx] = out.cpu().numpy()
            ok[idx] = good
        status, errors = ["ok"] * len(paths), [""] * len(paths)
        for i in np.flatnonzero(~ok):
            status[i], errors[i] = ds.refusal(int(i))
        return Predictions(probs, ok, status, errors, emb)

    def predict_proba(self, paths: Sequence[str], **options) -> tuple[np.ndarray, np.ndarray]:
        """``predict``'s class probabilities and mask of usable files (same options)."""
        p = self.predict(paths, **options)
        return p.probs, p.ok


def embedded(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate-layer embeddings, logits) of a timm model from one pass through its
    features: ``forward_head(pre_logits=True)`` and the head's output on the same features."""
    features = model.forward_features(images)
    return model.forward_head(features, pre_logits=True), model.forward_head(features)


_LOADED: dict[tuple, LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def _load_net(
    storage: Storage, cfg: TrainConfig, n_classes: int, key: str, sha: str | None, dev: torch.device
) -> torch.nn.Module:
    model = create_model(cfg, n_classes, pretrained=False)
    load_weights(model, storage.read_bytes(key), sha)
    return model.to(dev, memory_format=run_mode(dev).memory_format).eval()


def load_version(storage: Storage, version: str, device: str = "auto") -> LoadedModel:
    """Loads a model version once per process (later calls reuse it), checking every weights
    file against the sha256 recorded in model.json."""
    dev = resolve_device(device)
    meta = storage.read_json(layout.version(version, "model.json"))
    # The weights' hash and the temperature are in the key: a rewritten version (a temperature
    # fitted since) is never served from a stale copy.
    cache_key = (storage.uri, version, meta.get("sha256"), temperature_of(meta), str(dev))
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


def temperature_of(meta: dict) -> float:
    """The temperature a version's model.json holds (1 for versions trained before it)."""
    return float((meta.get("calibration") or {}).get("temperature", 1.0))


def align_probs(probs: np.ndarray, model_classes: list[str], classes: list[str]) -> np.ndarray:
    """Maps a model's class columns onto ``classes`` (a class the model lacks gets 0)."""
    out = np.zeros((len(probs), len(classes)), np.float32)
    pos = {c: i for i, c in enumerate(model_classes)}
    for j, c in enumerate(classes):
        if c in pos:
            out[:, j] = probs[:, pos[c]]
    return out
