"""Running a saved model version on image files, and batch scoring of ``incoming/``.

A prediction chunk is named by a hash of its (key, etag) pairs, so a rerun of the same chunk
writes the same file instead of a duplicate.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from darkroom.config import TrainConfig
from darkroom.data import SafeImageDataset, build_transform
from darkroom.model import create_model, load_weights, resolve_device
from darkroom.registry import version_key
from darkroom.storage import ObjectInfo, Storage, open_storage
from darkroom.sync import SyncReport, fetch_objects, is_image_key

log = logging.getLogger(__name__)

INCOMING = "incoming/"
PREDICTIONS = "predictions/"
PREDICTION_SCHEMA = pa.schema([
    ("key", pa.string()), ("etag", pa.string()), ("label", pa.string()),
    ("confidence", pa.float32()), ("topk_labels", pa.list_(pa.string())),
    ("topk_probs", pa.list_(pa.float32())), ("model_version", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")), ("status", pa.string()), ("error", pa.string()),
])


@dataclass
class LoadedModel:
    version: str
    meta: dict
    model: torch.nn.Module
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @torch.no_grad()
    def predict_proba(self, paths: Sequence[str], batch_size: int = 64,
                      num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities for ``paths`` (in order) and a mask of decodable files."""
        tf = build_transform(self.meta["image_size"], self.meta["mean"], self.meta["std"], "none")
        ds = SafeImageDataset(paths, tf, self.meta["image_size"])
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
        probs = np.zeros((len(paths), len(self.classes)), np.float32)
        ok = np.zeros(len(paths), bool)
        self.model.eval()
        for images, idx, good in loader:
            logits = self.model(images.to(self.device, non_blocking=True))
            probs[idx.numpy()] = torch.softmax(logits.float(), 1).cpu().numpy()
            ok[idx.numpy()] = good.numpy()
        return probs, ok


_LOADED: dict[tuple, LoadedModel] = {}


def load_version(storage: Storage, version: str, device: str = "auto") -> LoadedModel:
    """Loads a model version once per process (later calls reuse it), checking its sha256."""
    dev = resolve_device(device)
    meta = json.loads(storage.read_text(version_key(version, "model.json")))
    # The weights' hash is in the key: a rewritten version is never served from a stale copy.
    cache_key = (storage.uri, version, meta.get("sha256"), str(dev))
    if cache_key not in _LOADED:
        cfg = TrainConfig(**meta["train_config"])
        model = create_model(cfg, len(meta["classes"]), pretrained=False)
        load_weights(model, storage.read_bytes(version_key(version, "model.safetensors")),
                     meta.get("sha256"))
        _LOADED[cache_key] = LoadedModel(version, meta, model.to(dev).eval(), dev)
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


def scored_pairs(storage: Storage, version: str) -> set[tuple[str, str]]:
    """(key, etag) pairs that already have a prediction row for ``version``."""
    done: set[tuple[str, str]] = set()
    for obj in storage.list(f"{PREDICTIONS}{version}/"):
        if obj.key.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(storage.read_bytes(obj.key)), columns=["key", "etag"])
            done.update(zip(t.column("key").to_pylist(), t.column("etag").to_pylist(),
                            strict=True))
    return done


def plan_chunks(pending: Sequence[tuple[str, str]], chunk_size: int) -> list[list[tuple[str, str]]]:
    pending = sorted(pending)
    return [pending[i:i + chunk_size] for i in range(0, len(pending), chunk_size)]


def predictions_frame(loaded: LoadedModel, items: Sequence[tuple[str, str]],
                      probs: np.ndarray, ok: np.ndarray, errors: dict[str, str],
                      topk: int) -> pd.DataFrame:
    classes = np.array(loaded.classes)
    k = min(topk, len(classes))
    order = np.argsort(-probs, axis=1)[:, :k]
    now = datetime.now(UTC)
    rows = []
    for i, (key, etag) in enumerate(items):
        good = bool(ok[i]) and key not in errors
        top = order[i]
        rows.append({
            "key": key, "etag": etag,
            "label": str(classes[top[0]]) if good else None,
            "confidence": float(probs[i, top[0]]) if good else None,
            "topk_labels": classes[top].tolist() if good else [],
            "topk_probs": probs[i, top].astype(np.float32).tolist() if good else [],
            "model_version": loaded.version, "scored_at": now,
            "status": "ok" if good else "unreadable",
            "error": "" if good else errors.get(key, "OpenCV could not decode the file"),
        })
    return pd.DataFrame(rows)


def write_predictions(storage: Storage, version: str, cid: str, df: pd.DataFrame) -> str:
    table = pa.Table.from_pandas(df, schema=PREDICTION_SCHEMA, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    key = f"{PREDICTIONS}{version}/{cid}.parquet"
    storage.write_bytes(key, buf.getvalue())
    return key


def read_predictions(storage: Storage, version: str) -> pd.DataFrame:
    frames = [pd.read_parquet(io.BytesIO(storage.read_bytes(o.key)))
              for o in storage.list(f"{PREDICTIONS}{version}/") if o.key.endswith(".parquet")]
    if not frames:
        return PREDICTION_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


# ---- the scoring stage: what a scoring task runs ----------------------------------------

def pending_chunks(storage_uri: str, version: str, chunk_size: int,
                   rescore: bool = False) -> tuple[list[list[tuple[str, str]]], dict]:
    """Incoming (key, etag) pairs not yet scored by ``version``, in deterministic chunks."""
    storage = open_storage(storage_uri)
    listed = [(o.key, o.etag) for o in storage.list(INCOMING) if is_image_key(o.key)]
    done = set() if rescore else scored_pairs(storage, version)
    pending = [p for p in listed if p not in done]
    counts = {"incoming": len(listed), "already_scored": len(listed) - len(pending),
              "to_score": len(pending)}
    return plan_chunks(pending, chunk_size), counts


def score_chunk(storage_uri: str, cache_dir: str, version: str, items: list[tuple[str, str]],
                device: str = "auto", batch_size: int = 64, topk: int = 5,
                num_workers: int = 0) -> dict:
    """Scores one chunk and writes ``predictions/<version>/<chunk_id>.parquet``."""
    storage = open_storage(storage_uri)
    items = [tuple(p) for p in items]
    cid = chunk_id(items)
    objs = [ObjectInfo(k, 0, e, datetime.now(UTC)) for k, e in items]
    report = SyncReport(prefix=INCOMING)
    local = fetch_objects(storage, objs, Path(cache_dir), report)
    errors = {k: "could not fetch the object" for k in report.failed_keys + report.refused_keys}
    paths = [local[k].path if k in local else "" for k, _ in items]
    loaded = load_version(storage, version, device)
    probs, ok = loaded.predict_proba(paths, batch_size, num_workers)
    frame = predictions_frame(loaded, items, probs, ok, errors, topk)
    key = write_predictions(storage, version, cid, frame)
    return {"chunk_id": cid, "key": key, "images": len(items),
            "failed": int((frame["status"] != "ok").sum()),
            "per_class": frame["label"].value_counts().to_dict()}
