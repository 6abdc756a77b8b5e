"""The Reference a version keeps: its PCA, kNN distances, and one .npz that loads exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from darkroom.model.reference import (
    Reference,
    build_reference,
    fit_reduction,
    knn_distance,
)


def low_rank(n: int, rank: int = 8, width: int = 64, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Rows on a ``rank``-dimensional linear subspace of ``width`` dims (plus faint noise),
    away from the origin, and the orthonormal basis of that subspace. Scaling rows to unit
    length, as the reduction does first, keeps them on it."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(width, rank)))
    rows = (rng.normal(0, 3, (n, rank)) + 5.0) @ basis.T + rng.normal(0, 1e-3, (n, width))
    return rows, basis.T


def test_reduction_finds_the_subspace_and_its_components_are_orthonormal():
    rows, basis = low_rank(1000)
    red = fit_reduction(rows, dims=8, seed=0)
    assert red.components.shape == (8, 64) and red.mean.shape == (64,)
    np.testing.assert_allclose(red.components @ red.components.T, np.eye(8), atol=1e-5)
    # The kept components span the data's subspace: projecting the basis on them keeps it.
    np.testing.assert_allclose(np.linalg.norm(basis @ red.components.T, axis=1), 1.0, atol=1e-4)
    reduced = red.reduce(rows)
    assert reduced.shape == (1000, 9) and reduced.dtype == np.float32
    assert reduced[:, -1].max() < 0.05  # residual: only the noise is off the subspace


def test_reduction_is_the_same_for_the_same_data_and_seed():
    rows, _ = low_rank(3000)
    a, b = fit_reduction(rows, dims=4, max_samples=500, seed=7), fit_reduction(rows, 4, 500, 7)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.mean, b.mean)


def test_a_move_into_unused_directions_shows_in_the_last_column():
    rows, basis = low_rank(500)
    red = fit_reduction(rows, dims=8, seed=0)
    # A direction orthogonal to everything the training rows vary in.
    off = np.linalg.svd(basis, full_matrices=True)[2][-1]
    shifted = rows[:10] + 4.0 * off
    moved = red.reduce(shifted)
    # Rows are scaled to unit length first: the shift's share of the moved row is what is
    # left off the subspace, and the unmoved rows have (almost) nothing there.
    share = 4.0 / np.linalg.norm(shifted, axis=1)
    np.testing.assert_allclose(moved[:, -1], share, atol=1e-3)
    assert share.min() > 0.1 and red.reduce(rows[:10])[:, -1].max() < 1e-3


def test_dims_beyond_the_rows_are_clipped_and_bad_shapes_refused():
    rows, _ = low_rank(5, width=16)
    assert fit_reduction(rows, dims=32).components.shape == (5, 16)
    with pytest.raises(ValueError, match="shape"):
        fit_reduction(rows, dims=4).reduce(np.zeros((3, 15)))
    with pytest.raises(ValueError):
        fit_reduction(rows[:1])


def test_knn_distance_is_the_k_th_nearest_neighbour():
    rng = np.random.default_rng(0)
    points, queries = rng.normal(size=(1500, 6)), rng.normal(size=(2100, 6))
    expected = NearestNeighbors(n_neighbors=5).fit(points).kneighbors(queries)[0][:, -1]
    np.testing.assert_allclose(knn_distance(queries, points, 5), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="k must"):
        knn_distance(queries, points[:3], 5)


def small_reference(n: int = 3000, width: int = 64, dims: int = 8, **kw) -> Reference:
    rng = np.random.default_rng(1)
    rows, _ = low_rank(n + 500, width=width)
    classes = rng.integers(0, 3, n)
    return build_reference(
        rows[:n], rows[n:], classes, 4, rng.beta(8, 2, n), dims=dims, seed=0, **kw
    )


def test_build_reference_keeps_bounded_samples_and_the_class_mix():
    ref = small_reference(max_samples=1000, max_confidences=700)
    assert ref.embeddings.shape == (1000, 9) and ref.embeddings.dtype == np.float32
    assert ref.confidences.shape == (700,) and ref.knn_distances.shape == (500,)
    assert ref.class_mix.shape == (4,) and ref.class_mix[3] == 0.0
    assert ref.class_mix.sum() == pytest.approx(1.0)
    assert ref.knn_threshold == pytest.approx(np.percentile(ref.knn_distances, 99), rel=1e-5)
    with pytest.raises(ValueError, match="classes"):
        build_reference(np.ones((10, 4)) * np.arange(10)[:, None], np.ones((2, 4)), [5], 3, [1])


def test_round_trip_through_npz_bytes_is_exact():
    ref = small_reference()
    back = Reference.from_npz(ref.to_npz())
    for name, array in ref.to_arrays().items():
        loaded = back.to_arrays()[name]
        assert loaded.dtype == array.dtype, name
        np.testing.assert_array_equal(loaded, array, err_msg=name)
    assert (back.knn_threshold, back.k, back.percentile) == (ref.knn_threshold, 5, 99.0)


def test_a_2000_by_64_reference_is_under_2_mb():
    ref = small_reference(n=2500, width=256, dims=64)
    assert ref.embeddings.shape == (2000, 65)
    assert len(ref.to_npz()) < 2 * 1024 * 1024


def test_loading_refuses_pickles_and_other_formats():
    buf = io.BytesIO()
    np.savez(buf, format=np.array(1), mean=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError):
        Reference.from_npz(buf.getvalue())
    arrays = small_reference().to_arrays() | {"format": np.array(99)}
    with pytest.raises(ValueError, match="format 99"):
        Reference.from_arrays(arrays)
