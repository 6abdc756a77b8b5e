"""The reference a retrain keeps with each version (``models/<version>/reference.npz``): what
every later scoring run of that version is compared with.

Made after the candidate's temperature is fitted, from the candidate itself: the embeddings of
a bounded sample of its training images and of its holdout images (whose distances to the
training sample set the "unfamiliar" threshold), through the same ``LoadedModel`` and forward
pass that scoring uses; the class mix and calibrated confidences of its out-of-fold predictions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data.fetch import local_paths
from darkroom.data.index import read_index
from darkroom.model.calibration import apply_temperature
from darkroom.model.inference import load_version, temperature_of
from darkroom.model.reference import build_reference
from darkroom.scoring.familiar import REFERENCE
from darkroom.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class ReferenceSummary:
    """What went into a version's reference."""

    version: str
    train_images: int
    holdout_images: int
    dims: int
    knn_threshold: float
    bytes: int
    url: str


def keep_reference(
    storage: Storage, config: RetrainConfig, snapshot: str, version: str
) -> ReferenceSummary:
    """Embeds the sample, builds the reference and writes it beside the version's model."""
    rows, classes, _ = read_index(storage, snapshot)
    ref_cfg, seed = config.reference, config.train.seed
    train = rows[rows["split"] == "train"]
    train = train.sample(n=min(len(train), ref_cfg.max_samples), random_state=seed)
    holdout = rows[rows["split"] == "holdout"].head(ref_cfg.max_samples)
    loaded = load_version(storage, version, config.device)
    train_emb, hold_emb = (_embed(storage, config, loaded, part) for part in (train, holdout))
    oof = storage.read_parquet(layout.version(version, "oof.parquet"))
    oof_probs = np.stack(oof["probs"].to_numpy())
    calibrated = apply_temperature(
        np.log(np.clip(oof_probs, 1e-12, None)), temperature_of(loaded.meta)
    )
    reference = build_reference(
        train_emb,
        hold_emb,
        oof_probs.argmax(axis=1),
        len(classes),
        calibrated.max(axis=1),
        dims=ref_cfg.dims,
        k=ref_cfg.k,
        percentile=ref_cfg.percentile,
        max_samples=ref_cfg.max_samples,
        seed=seed,
    )
    data = reference.to_npz()
    key = layout.version(version, REFERENCE)
    storage.write_bytes(key, data)
    return ReferenceSummary(
        version,
        len(train_emb),
        len(hold_emb),
        reference.embeddings.shape[1],
        reference.knn_threshold,
        len(data),
        storage.url(key),
    )


def _embed(storage: Storage, config: RetrainConfig, loaded, rows) -> np.ndarray:
    """The embeddings of the usable images among ``rows`` (the same pass scoring makes)."""
    paths = local_paths(storage, rows, config.cache_path(storage.uri))
    pred = loaded.predict(paths, batch_size=64, max_pixels=config.max_image_pixels, embed=True)
    if pred.embeddings is None:
        return np.zeros((0, 1), np.float32)
    return pred.embeddings[pred.ok]
