"""Which images are worth a person's labels.

The ones the champion is least sure of, spread over the embedding space so that 200 near-copies
of one confusing image are not the whole queue, plus a random share: labels of a random sample
stay an unbiased measure of accuracy, and catch the mistakes the champion is sure of.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# Rows of the sample the typical pairwise distance (the scale of duplicate_radius) is taken on.
_SCALE_SAMPLE = 500


def _probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"expected probabilities of shape (n, classes), got {p.shape}")
    return p


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (p1 - p2): near 1 when the two likeliest classes are a tie."""
    p = _probs(probs)
    if p.shape[1] == 1:
        return 1.0 - p[:, 0]
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats: high when the probability is spread over many classes."""
    p = _probs(probs)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)  # 0 log 0 = 0
    return -(p * logs).sum(axis=1)


def least_confident(probs: np.ndarray) -> np.ndarray:
    """1 - p1."""
    return 1.0 - _probs(probs).max(axis=1)


# Name -> score, higher = more uncertain.
STRATEGIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "margin": margin,
    "entropy": entropy,
    "least_confident": least_confident,
}


def uncertainty(probs: np.ndarray, strategy: str = "margin") -> np.ndarray:
    """Each row's uncertainty under ``strategy`` (a name of ``STRATEGIES``)."""
    try:
        score = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}: one of {sorted(STRATEGIES)}") from None
    return score(probs)


@dataclass(frozen=True)
class Selection:
    """Images to label, uncertain picks first (in pick order), then the random ones.

    Attributes:
        indices: Row of each picked image in the batch.
        reasons: "uncertain" or "random", per index.
        scores: Its uncertainty, per index.
    """

    indices: list[int]
    reasons: list[str]
    scores: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def _typical_distance(emb: np.ndarray, rng: np.random.Generator) -> float:
    """Median pairwise distance over a bounded sample of the rows."""
    x = emb[rng.permutation(len(emb))[:_SCALE_SAMPLE]]
    sq = (x * x).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(x), 1)]))) if len(x) > 1 else 0.0


def _distinct_pool(order: np.ndarray, emb: np.ndarray, size: int, radius: float) -> list[int]:
    """The first ``size`` rows of ``order`` that lie farther than ``radius`` from every row
    taken before them: without it, copies of one image more uncertain than the rest would
    fill the whole candidate pool, and k-center could pick nothing else."""
    pool: list[int] = []
    for i in order:
        if len(pool) == size:
            break
        if not pool or ((emb[pool] - emb[i]) ** 2).sum(axis=1).min() > radius * radius:
            pool.append(int(i))
    return pool


def k_center(emb: np.ndarray, count: int) -> list[int]:
    """Greedy k-center: row 0 first, then each time the row farthest from all rows taken."""
    if count <= 0 or len(emb) == 0:
        return []
    picks = [0]
    nearest = ((emb - emb[0]) ** 2).sum(axis=1)
    nearest[0] = -1.0  # taken rows never win again, even where every distance is 0
    while len(picks) < min(count, len(emb)):
        nxt = int(np.argmax(nearest))
        picks.append(nxt)
        nearest = np.minimum(nearest, ((emb - emb[nxt]) ** 2).sum(axis=1))
        nearest[picks] = -1.0
    return picks


def select(
    probs: np.ndarray,
    embeddings: np.ndarray,
    n: int,
    strategy: str = "margin",
    random_share: float = 0.1,
    candidate_factor: int = 5,
    duplicate_radius: float = 0.05,
    seed: int = 0,
) -> Selection:
    """Picks ``n`` images to label (fewer when the batch has fewer).

    ``round(n * random_share)`` are drawn at random. Of the others, the candidates are the
    ``(n - n_random) * candidate_factor`` most uncertain, skipping any within
    ``duplicate_radius`` of a more uncertain candidate; greedy k-center on their embeddings,
    from the most uncertain, picks the rest.

    Args:
        probs: (N, classes) calibrated probabilities.
        embeddings: (N, d) embeddings, reduced ones included.
        n: Images wanted.
        strategy: Name of the uncertainty score (``STRATEGIES``).
        random_share: Share of ``n`` drawn at random.
        candidate_factor: Candidates per uncertain pick.
        duplicate_radius: As a share of the median pairwise distance; 0 keeps copies.
        seed: Seed of the random picks and of the distance sample.
    """
    scores = uncertainty(probs, strategy)
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or len(emb) != len(scores):
        raise ValueError(f"{len(scores)} probability rows but embeddings of shape {emb.shape}")
    if not 0.0 <= random_share <= 1.0 or candidate_factor < 1:
        raise ValueError("random_share must lie in [0, 1] and candidate_factor be at least 1")
    n, rng = max(0, min(n, len(scores))), np.random.default_rng(seed)
    n_random = math.floor(n * random_share + 0.5)  # round half up, not to even
    randoms = rng.choice(len(scores), n_random, replace=False)
    rest = np.setdiff1d(np.arange(len(scores)), randoms)
    order = rest[np.argsort(-scores[rest], kind="stable")]
    radius = duplicate_radius * _typical_distance(emb, rng) if duplicate_radius > 0 else 0.0
    pool = _distinct_pool(order, emb, (n - n_random) * candidate_factor, radius)
    chosen = [pool[j] for j in k_center(emb[pool], n - n_random)]
    # Too few distinct candidates: the queue still gets its n, the next most uncertain.
    taken = set(chosen)
    chosen += [int(i) for i in order if i not in taken][: n - n_random - len(chosen)]
    indices = chosen + [int(i) for i in randoms]
    return Selection(
        indices=indices,
        reasons=["uncertain"] * len(chosen) + ["random"] * n_random,
        scores=[float(scores[i]) for i in indices],
    )
