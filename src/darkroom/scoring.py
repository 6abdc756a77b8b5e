"""Running a saved model version on image files, and batch scoring of ``incoming/``.

A prediction chunk is named by a hash of its (key, etag) pairs, so a rerun of the same chunk
writes the same file instead of a duplicate.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from darkroom.config import TrainConfig
from darkroom.data import SafeImageDataset, build_transform, worker_context
from darkroom.model import create_model, load_weights, resolve_device
from darkroom.registry import version_key
from darkroom.storage import ObjectInfo, Storage, open_storage
from darkroom.sync import SyncReport, fetch_objects, is_image_key

log = logging.getLogger(__name__)

INCOMING = "incoming/"
PREDICTIONS = "predictions/"
PREDICTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("etag", pa.string()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("low_confidence", pa.bool_()),
        ("topk_labels", pa.list_(pa.string())),
        ("topk_probs", pa.list_(pa.float32())),
        ("model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


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
    def predict_proba(
        self, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0, tta: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities for ``paths`` (in order) and a mask of decodable files.

        Args:
            tta: also score the horizontal flip of each image and average the views.
        """
        tf = build_transform(self.meta["image_size"], self.meta["mean"], self.meta["std"], "none")
        ds = SafeImageDataset(paths, tf, self.meta["image_size"])
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
        return probs, ok


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
    meta = json.loads(storage.read_text(version_key(version, "model.json")))
    # The weights' hash is in the key: a rewritten version is never served from a stale copy.
    cache_key = (storage.uri, version, meta.get("sha256"), str(dev))
    with _LOAD_LOCK:  # chunk tasks in threads share one copy
        if cache_key not in _LOADED:
            cfg = TrainConfig(**meta["train_config"])
            n = len(meta["classes"])
            members = [
                (version_key(version, m["key"]), m["sha256"]) for m in meta.get("ensemble") or []
            ]
            if not members:
                members = [(version_key(version, "model.safetensors"), meta.get("sha256"))]
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


def chunk_id(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, etag in sorted(pairs):
        h.update(f"{key}\x1f{etag}\x1e".encode())
    return h.hexdigest()[:20]


def scored_pairs(storage: Storage, version: str | None) -> set[tuple[str, str]]:
    """(key, etag) pairs that have a prediction row for ``version`` (None: any version)."""
    done: set[tuple[str, str]] = set()
    prefix = f"{PREDICTIONS}{version}/" if version else PREDICTIONS
    for obj in storage.list(prefix):
        if obj.key.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(storage.read_bytes(obj.key)), columns=["key", "etag"])
            done.update(zip(t.column("key").to_pylist(), t.column("etag").to_pylist(), strict=True))
    return done


def plan_chunks(pending: Sequence[tuple[str, str]], chunk_size: int) -> list[list[tuple[str, str]]]:
    pending = sorted(pending)
    return [pending[i : i + chunk_size] for i in range(0, len(pending), chunk_size)]


def predictions_frame(
    loaded: LoadedModel,
    items: Sequence[tuple[str, str]],
    probs: np.ndarray,
    ok: np.ndarray,
    errors: dict[str, str],
    topk: int,
    low_confidence: float = 0.5,
) -> pd.DataFrame:
    classes = np.array(loaded.classes)
    k = min(topk, len(classes))
    order = np.argsort(-probs, axis=1)[:, :k]
    now = datetime.now(UTC)
    rows = []
    for i, (key, etag) in enumerate(items):
        good = bool(ok[i]) and key not in errors
        top = order[i]
        rows.append(
            {
                "key": key,
                "etag": etag,
                "label": str(classes[top[0]]) if good else None,
                "confidence": float(probs[i, top[0]]) if good else None,
                "low_confidence": bool(probs[i, top[0]] < low_confidence) if good else None,
                "topk_labels": classes[top].tolist() if good else [],
                "topk_probs": probs[i, top].astype(np.float32).tolist() if good else [],
                "model_version": loaded.version,
                "scored_at": now,
                "status": "ok" if good else "unreadable",
                "error": "" if good else errors.get(key, "OpenCV could not decode the file"),
            }
        )
    return pd.DataFrame(rows)


def write_predictions(storage: Storage, version: str, cid: str, df: pd.DataFrame) -> str:
    table = pa.Table.from_pandas(df, schema=PREDICTION_SCHEMA, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    key = f"{PREDICTIONS}{version}/{cid}.parquet"
    storage.write_bytes(key, buf.getvalue())
    return key


def read_predictions(storage: Storage, version: str) -> pd.DataFrame:
    frames = [
        pd.read_parquet(io.BytesIO(storage.read_bytes(o.key)))
        for o in storage.list(f"{PREDICTIONS}{version}/")
        if o.key.endswith(".parquet")
    ]
    if not frames:
        return PREDICTION_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


# ---- the scoring stage: what a scoring task runs ----------------------------------------


def pending_chunks(
    storage_uri: str, version: str, chunk_size: int, rescore: bool = False
) -> tuple[list[list[tuple[str, str]]], dict]:
    """Incoming (key, etag) pairs to score, in deterministic chunks.

    New images are those no model version has scored yet; with ``rescore``, every pair that
    ``version`` itself has not scored (older versions' predictions stay as they are).
    """
    storage = open_storage(storage_uri)
    listed = [(o.key, o.etag) for o in storage.list(INCOMING) if is_image_key(o.key)]
    done = scored_pairs(storage, version)
    if not rescore:
        done |= scored_pairs(storage, None)
    pending = [p for p in listed if p not in done]
    counts = {
        "incoming": len(listed),
        "already_scored": len(listed) - len(pending),
        "to_score": len(pending),
    }
    return plan_chunks(pending, chunk_size), counts


def score_chunk(
    storage_uri: str,
    cache_dir: str,
    version: str,
    items: list[tuple[str, str]],
    device: str = "auto",
    batch_size: int = 64,
    topk: int = 5,
    num_workers: int = 0,
    tta: bool = False,
    low_confidence: float = 0.5,
) -> dict:
    """Scores one chunk and writes ``predictions/<version>/<chunk_id>.parquet`` atomically
    (the same chunk always gets the same name, so a retry replaces, never duplicates)."""
    storage = open_storage(storage_uri)
    items = [tuple(p) for p in items]
    cid = chunk_id(items)
    objs = [ObjectInfo(k, 0, e, datetime.now(UTC)) for k, e in items]
    report = SyncReport(prefix=INCOMING)
    local = fetch_objects(storage, objs, Path(cache_dir), report)
    errors = {k: "could not fetch the object" for k in report.failed_keys + report.refused_keys}
    paths = [local[k].path if k in local else "" for k, _ in items]
    loaded = load_version(storage, version, device)
    probs, ok = loaded.predict_proba(paths, batch_size, num_workers, tta=tta)
    frame = predictions_frame(loaded, items, probs, ok, errors, topk, low_confidence)
    key = write_predictions(storage, version, cid, frame)
    return {
        "chunk_id": cid,
        "key": key,
        "images": len(items),
        "failed": int((frame["status"] != "ok").sum()),
        "low_confidence": int(frame["low_confidence"].fillna(False).astype(bool).sum()),
        "per_class": frame["label"].value_counts().to_dict(),
    }
