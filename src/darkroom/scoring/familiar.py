"""How familiar each scored image is to the champion: its embedding (from the forward pass that
scored it) through the version's reference PCA, its distance to the k-th nearest reference
image, and whether that lies past the threshold the holdout set (``unfamiliar``).

These are three columns of the prediction rows; the run's drift report (darkroom.monitoring)
reads them back. A version without a reference (trained before references were kept) gets
empty columns and no report.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from darkroom import layout
from darkroom.model.reference import Reference, knn_distance
from darkroom.storage import Storage

log = logging.getLogger(__name__)

REFERENCE = "reference.npz"
COLUMNS = (
    ("unfamiliar", pa.bool_()),
    ("knn_distance", pa.float32()),
    ("embedding", pa.list_(pa.float32())),
)


@dataclass
class Familiarity:
    """Per image of a chunk: reduced embedding, distance to the reference, the flag."""

    embeddings: np.ndarray  # (n, dims) float32
    distances: np.ndarray  # (n,) float32
    unfamiliar: np.ndarray  # (n,) bool


def read_reference(storage: Storage, version: str) -> Reference | None:
    """The version's reference, or None for a version trained without one. Read once per
    (root, version, file) in a process: the chunks of a run share it."""
    key = layout.version(version, REFERENCE)
    etag = storage.etag(key)
    if etag is None:
        return None
    at = (storage.uri, version, etag)
    with _LOCK:
        if at not in _READ:
            if len(_READ) >= 4:
                _READ.clear()
            _READ[at] = Reference.from_npz(storage.read_bytes(key))
        return _READ[at]


_READ: dict[tuple[str, str, str], Reference] = {}
_LOCK = threading.Lock()


def familiarity(reference: Reference, raw: np.ndarray) -> Familiarity:
    """The reduced embeddings of ``raw`` (penultimate-layer rows) and how far each lies from
    the reference's sample, against its threshold."""
    reduced = reference.reduction.reduce(raw).astype(np.float32)
    distances = knn_distance(reduced, reference.embeddings, reference.k).astype(np.float32)
    return Familiarity(reduced, distances, distances > reference.knn_threshold)


def joined(parts) -> Familiarity | None:
    """The familiarity of a chunk's slices, in order (None when the version has no reference)."""
    if any(f is None for f in parts):
        return None
    return Familiarity(*(np.concatenate([getattr(f, a) for f in parts]) for a in FIELDS))


FIELDS = ("embeddings", "distances", "unfamiliar")


def columns(fam: Familiarity | None, good: np.ndarray) -> dict[str, pa.Array]:
    """The three columns for a chunk's rows (null where the image was not scored, or when the
    version has no reference)."""
    n, bad = len(good), ~good
    if fam is None:
        return {name: pa.nulls(n, kind) for name, kind in COLUMNS}
    dims = fam.embeddings.shape[1]
    offsets = np.concatenate([[0], np.cumsum(np.where(good, dims, 0))])
    return {
        "unfamiliar": pa.array(fam.unfamiliar, mask=bad),
        "knn_distance": pa.array(fam.distances, mask=bad),
        "embedding": pa.ListArray.from_arrays(
            pa.array(offsets, pa.int32()),
            pa.array(fam.embeddings[good].ravel()),
            mask=pa.array(bad),
        ),
    }
