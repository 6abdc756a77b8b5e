"""Picking the images worth a person's labels: uncertain ones, spread out, plus a random share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from darkroom.monitoring.queue import (
    STRATEGIES,
    entropy,
    k_center,
    least_confident,
    margin,
    select,
    uncertainty,
)

# Certain; fairly sure with the rest spread; a near tie of two; a three-way tie.
HAND_MADE = np.array([[1.0, 0.0, 0.0], [0.6, 0.2, 0.2], [0.5, 0.45, 0.05], [1 / 3, 1 / 3, 1 / 3]])


@pytest.mark.parametrize(
    ("strategy", "least_to_most"),
    [
        ("margin", [0, 1, 2, 3]),
        ("least_confident", [0, 1, 2, 3]),
        # Entropy sees the spread of [0.6, 0.2, 0.2] as less sure than the near tie.
        ("entropy", [0, 2, 1, 3]),
    ],
)
def test_each_strategy_ranks_the_hand_made_rows(strategy, least_to_most):
    assert np.argsort(uncertainty(HAND_MADE, strategy), kind="stable").tolist() == least_to_most


def test_the_scores_are_the_textbook_ones():
    np.testing.assert_allclose(margin(HAND_MADE), [0.0, 0.6, 0.95, 1.0])
    np.testing.assert_allclose(least_confident(HAND_MADE), [0.0, 0.4, 0.5, 2 / 3])
    np.testing.assert_allclose(entropy(HAND_MADE)[[0, 3]], [0.0, np.log(3)])
    assert margin(np.array([[0.3], [0.9]])).tolist() == pytest.approx([0.7, 0.1])
    assert set(STRATEGIES) == {"margin", "entropy", "least_confident"}
    with pytest.raises(ValueError, match="unknown strategy"):
        uncertainty(HAND_MADE, "random")


def batch_with_copies(copies: int = 200, others: int = 300, seed: int = 0):
    """``copies`` near-copies of one image the champion finds most confusing, then ``others``
    varied images that are a little less so."""
    rng = np.random.default_rng(seed)
    emb = np.vstack(
        [rng.normal(0, 1, 16) + rng.normal(0, 1e-3, (copies, 16)), rng.normal(0, 1, (others, 16))]
    )
    top = np.concatenate([rng.uniform(0.50, 0.505, copies), rng.uniform(0.51, 0.7, others)])
    probs = np.column_stack([top, 1.0 - top - 0.01, np.full(len(top), 0.01)])
    return probs, emb


def test_near_copies_of_one_confusing_image_are_not_the_queue():
    probs, emb = batch_with_copies()
    sel = select(probs, emb, 20, seed=0)
    assert len(sel.indices) == 20 and len(set(sel.indices)) == 20
    assert sum(i < 200 for i in sel.indices) <= 3
    assert sel.indices[0] < 200 and sel.reasons[0] == "uncertain"  # the most uncertain first
    # The 18 most uncertain alone would all be copies.
    assert (np.argsort(-margin(probs), kind="stable")[:18] < 200).all()


def test_k_center_spreads_over_a_pool_that_holds_copies():
    probs, emb = batch_with_copies(copies=40, others=300)
    sel = select(probs, emb, 20, random_share=0.0, duplicate_radius=0.0, seed=0)
    assert sum(i < 40 for i in sel.indices) <= 2
    picks = k_center(np.vstack([np.zeros((50, 2)), np.eye(2), -np.eye(2)]), 5)
    assert sorted(picks)[0] == 0 and sorted(picks)[1:] == [50, 51, 52, 53]


@pytest.mark.parametrize(("n", "share", "randoms"), [(20, 0.1, 2), (20, 0.25, 5), (10, 0.25, 3)])
def test_the_random_share_is_honoured(n, share, randoms):
    probs, emb = batch_with_copies()
    sel = select(probs, emb, n, random_share=share, seed=1)
    assert sel.reasons.count("random") == randoms and len(sel.indices) == n
    assert len(set(sel.indices)) == n
    assert sel.reasons == ["uncertain"] * (n - randoms) + ["random"] * randoms
    assert sel.scores == pytest.approx(margin(probs)[sel.indices].tolist())


def test_selection_is_seeded_and_bounded_by_the_batch():
    probs, emb = batch_with_copies(copies=5, others=20)
    assert select(probs, emb, 10, seed=3) == select(probs, emb, 10, seed=3)
    assert (
        select(probs, emb, 10, seed=3).indices[-1:] != select(probs, emb, 10, seed=4).indices[-1:]
    )
    everything = select(probs, emb, 100, seed=0)
    assert sorted(everything.indices) == list(range(25))
    assert select(probs, emb, 0).indices == []
    assert json.loads(json.dumps(everything.as_dict()))["reasons"].count("random") == 3


def test_only_copies_still_fill_the_queue():
    probs, emb = batch_with_copies(copies=30, others=0)
    sel = select(probs, emb, 10, seed=0)
    assert len(set(sel.indices)) == 10
