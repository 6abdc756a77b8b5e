"""What a model version keeps at training time to judge later batches by.

A PCA of its penultimate-layer embeddings, the class mix and calibrated confidences of its
out-of-fold predictions, a bounded sample of reduced embeddings, and the distance to the k-th
nearest of them past which an image is unlike anything the version was trained on. All of it
is numpy arrays: one ``.npz`` of a few hundred KB, loaded without pickle.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Bumped when the arrays change meaning, so an old file is refused instead of misread.
# 2: embeddings are scaled to unit length before the PCA.
FORMAT = 2
# Query rows per block of the distance matrix: 1,024 x 2,000 float64 is 16 MB.
_CHUNK = 1024


def _matrix(values: np.ndarray, width: int | None = None) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or (width is not None and x.shape[1] != width):
        want = f"(n, {width})" if width is not None else "(n, width)"
        raise ValueError(f"expected embeddings of shape {want}, got {x.shape}")
    return x


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero). Distances between penultimate
    embeddings then compare their directions, not their magnitudes, which track confidence
    more than content: nearest-neighbour out-of-distribution detection works on these (Sun et
    al., "Out-of-distribution detection with deep nearest neighbors", ICML 2022)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _sample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` rows, drawn without replacement; their order kept."""
    if len(values) <= limit:
        return values
    return values[np.sort(rng.choice(len(values), limit, replace=False))]


@dataclass(frozen=True)
class Reduction:
    """A PCA of embeddings scaled to unit length (``unit_rows``), fitted with numpy's SVD.

    ``reduce`` maps (n, D) embeddings to (n, dims + 1): the coordinates on the kept
    components, then the distance to their subspace. That last column is there because an
    image that moves into directions training never used would otherwise project onto the
    components as an ordinary one.

    Attributes:
        mean: (D,) mean the components are centred on.
        components: (dims, D) orthonormal rows, largest variance first.
    """

    mean: np.ndarray
    components: np.ndarray

    def reduce(self, embeddings: np.ndarray) -> np.ndarray:
        """The reduced embeddings, float32, shape (n, dims + 1)."""
        x = unit_rows(_matrix(embeddings, self.mean.shape[0])) - self.mean
        coords = x @ self.components.T.astype(np.float64)
        residual = np.sqrt(np.maximum((x * x).sum(1) - (coords * coords).sum(1), 0.0))
        return np.hstack([coords, residual[:, None]]).astype(np.float32)


def fit_reduction(
    embeddings: np.ndarray, dims: int = 32, max_samples: int = 5000, seed: int = 0
) -> Reduction:
    """Fits a PCA on at most ``max_samples`` rows of ``embeddings`` (n, D).

    Args:
        embeddings: Penultimate-layer embeddings of the training images.
        dims: Components kept (fewer when there are fewer rows or columns).
        max_samples: Rows the SVD sees, drawn with ``seed``: its cost grows with them.
        seed: Seed of that draw.
    """
    if dims < 1:
        raise ValueError(f"dims must be at least 1, got {dims}")
    x = unit_rows(_sample(_matrix(embeddings), max_samples, np.random.default_rng(seed)))
    if len(x) < 2:
        raise ValueError("a reduction needs at least 2 embeddings")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dims]
    # An SVD's signs are arbitrary: fixing them (largest entry positive) gives the same
    # numbers for the same data on any BLAS.
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    return Reduction(mean.astype(np.float32), (comps * signs[:, None]).astype(np.float32))


def knn_distance(queries: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each query row to its k-th nearest row of ``points``."""
    q, p = _matrix(queries), _matrix(points)
    if q.shape[1] != p.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} columns, points {p.shape[1]}")
    if not 1 <= k <= len(p):
        raise ValueError(f"k must be between 1 and the {len(p)} reference points, got {k}")
    p_sq = (p * p).sum(axis=1)
    out = np.empty(len(q))
    for start in range(0, len(q), _CHUNK):
        block = q[start : start + _CHUNK]
        d2 = (block * block).sum(axis=1)[:, None] + p_sq[None, :] - 2.0 * block @ p.T
        out[start : start + len(block)] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(out, 0.0))


@dataclass(frozen=True)
class Reference:
    """What later batches of a version are compared with.

    Attributes:
        reduction: The PCA batch embeddings go through before any comparison.
        class_mix: (n_classes,) share of each class among the out-of-fold predictions.
        confidences: Sample of the out-of-fold calibrated confidences (float32).
        embeddings: Sample of reduced training embeddings, (m, dims + 1) float32.
        knn_distances: The holdout's distances to its k-th nearest reference embedding.
        knn_threshold: Their ``percentile``-th percentile: past it an image is unfamiliar.
        k: Which neighbour the distances are to.
        percentile: The percentile the threshold was taken at.
    """

    reduction: Reduction
    class_mix: np.ndarray
    confidences: np.ndarray
    embeddings: np.ndarray
    knn_distances: np.ndarray
    knn_threshold: float
    k: int
    percentile: float

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays for ``np.savez_compressed`` (scalars as 0-d arrays)."""
        return {
            "format": np.array(FORMAT),
            "mean": self.reduction.mean,
            "components": self.reduction.components,
            "class_mix": self.class_mix,
            "confidences": self.confidences,
            "embeddings": self.embeddings,
            "knn_distances": self.knn_distances,
            "knn_threshold": np.array(self.knn_threshold, dtype=np.float64),
            "k": np.array(self.k, dtype=np.int64),
            "percentile": np.array(self.percentile, dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Reference:
        """The Reference ``to_arrays`` gave these arrays for."""
        found = int(arrays["format"]) if "format" in arrays else None
        if found != FORMAT:
            raise ValueError(f"reference format {found}; this darkroom reads format {FORMAT}")
        return cls(
            reduction=Reduction(np.asarray(arrays["mean"]), np.asarray(arrays["components"])),
            class_mix=np.asarray(arrays["class_mix"]),
            confidences=np.asarray(arrays["confidences"]),
            embeddings=np.asarray(arrays["embeddings"]),
            knn_distances=np.asarray(arrays["knn_distances"]),
            knn_threshold=float(arrays["knn_threshold"]),
            k=int(arrays["k"]),
            percentile=float(arrays["percentile"]),
        )

    def to_npz(self) -> bytes:
        """One compressed ``.npz`` file's bytes."""
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.to_arrays())
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> Reference:
        """Reads ``to_npz``'s bytes; never unpickles (the file may come from a bucket)."""
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls.from_arrays({name: npz[name] for name in npz.files})


def build_reference(
    train_embeddings: np.ndarray,
    holdout_embeddings: np.ndarray,
    oof_pred_classes: np.ndarray,
    n_classes: int,
    oof_confidences: np.ndarray,
    dims: int = 32,
    k: int = 5,
    percentile: float = 99.0,
    max_samples: int = 2000,
    max_confidences: int = 5000,
    seed: int = 0,
) -> Reference:
    """The Reference of a version, at training time.

    Args:
        train_embeddings: (n, D) penultimate-layer embeddings of the training images.
        holdout_embeddings: (h, D) embeddings of images the reference sample does not hold
            (holdout or out-of-fold): their distances set the threshold a new image is judged
            by, where the training images' own distances would be too short.
        oof_pred_classes: Class index predicted for each out-of-fold image.
        oof_confidences: Calibrated confidence of each out-of-fold prediction.
        dims: PCA components kept.
        k: The neighbour whose distance is measured.
        percentile: Percentile of the holdout's distances taken as the threshold.
        max_samples: Rows kept of the reduced training embeddings (and of the holdout's).
        max_confidences: Confidences kept.
        seed: Seed of every draw.
    """
    rng = np.random.default_rng(seed)
    reduction = fit_reduction(train_embeddings, dims=dims, seed=seed)
    kept = reduction.reduce(_sample(_matrix(train_embeddings), max_samples, rng))
    holdout = reduction.reduce(_sample(_matrix(holdout_embeddings), max_samples, rng))
    if len(holdout) == 0:
        raise ValueError("the threshold needs at least one holdout embedding")
    distances = knn_distance(holdout, kept, k)
    classes = np.asarray(oof_pred_classes, dtype=np.int64)
    if classes.size == 0 or classes.min() < 0 or classes.max() >= n_classes:
        raise ValueError(f"out-of-fold classes must be non-empty and in [0, {n_classes})")
    confidences = np.asarray(oof_confidences, dtype=np.float32).ravel()
    return Reference(
        reduction=reduction,
        class_mix=np.bincount(classes, minlength=n_classes) / classes.size,
        confidences=_sample(confidences, max_confidences, rng),
        embeddings=kept,
        knn_distances=distances.astype(np.float32),
        knn_threshold=float(np.percentile(distances, percentile)),
        k=int(k),
        percentile=float(percentile),
    )
