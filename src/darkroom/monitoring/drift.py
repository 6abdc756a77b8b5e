"""Drift of one batch against a version's Reference: the predicted class mix (chi-square,
Jensen-Shannon distance), the calibrated confidences (two-sample Kolmogorov-Smirnov), the
embeddings (MMD, RBF kernel, permutation test), each image's distance to the training embeddings
(the unfamiliar ones), and from the familiar images' confidences the accuracy the batch can be
expected to get before anyone labels it."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.spatial.distance import jensenshannon  # noqa: E402
from scipy.stats import chisquare, ks_2samp  # noqa: E402

from darkroom.config.monitoring import DriftConfig  # noqa: E402
from darkroom.model.reference import Reference, knn_distance  # noqa: E402

# Share added to each class of the reference mix for the chi-square test: a class the
# reference never predicted would otherwise expect zero images and divide by zero.
MIX_SMOOTHING = 1e-3
HIST_BINS = 20


@dataclass(frozen=True)
class Histogram:
    """Shares of the reference and of the batch in the bins between ``edges``."""

    edges: list[float]
    reference: list[float]
    batch: list[float]


@dataclass(frozen=True)
class DriftReport:
    """One batch against a Reference. A figure is None where the batch is too small for it."""

    verdict: str  # "ok" | "drift" | "too few to tell"
    drifted: bool
    reasons: list[str]
    n_images: int
    reference_mix: list[float]
    batch_mix: list[float]
    chi2_p: float | None
    js_distance: float | None
    ks_statistic: float | None
    ks_p: float | None
    mmd2: float | None
    mmd_p: float | None
    unfamiliar_share: float
    knn_threshold: float
    expected_accuracy: float | None
    range_low: float | None
    range_high: float | None
    headline: float | None
    confidence_hist: Histogram
    knn_hist: Histogram

    def as_dict(self) -> dict:
        return asdict(self)


def class_mix_test(
    reference_mix: np.ndarray, pred_classes: np.ndarray
) -> tuple[float | None, float | None, np.ndarray]:
    """Chi-square p-value and Jensen-Shannon distance (base 2) of the batch's class mix
    against the reference's; returns (p, distance, batch mix)."""
    mix = np.asarray(reference_mix, dtype=np.float64)
    counts = np.bincount(pred_classes, minlength=len(mix)).astype(np.float64)
    if counts.sum() == 0:
        return None, None, counts
    smoothed = (mix + MIX_SMOOTHING) / (mix + MIX_SMOOTHING).sum()
    # One class has nothing to test (zero degrees of freedom).
    p = float(chisquare(counts, smoothed * counts.sum()).pvalue) if len(mix) > 1 else 1.0
    batch_mix = counts / counts.sum()
    return p, float(jensenshannon(mix, batch_mix, base=2)), batch_mix


def mmd_test(
    x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD^2 between samples ``x`` and ``y`` (RBF kernel, bandwidth at the median
    pairwise distance) and its permutation-test p-value, never below 1 / (permutations + 1)."""
    z = np.vstack([x, y]).astype(np.float64)
    m, size = len(x), len(z)
    n = size - m
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least 2 rows on each side")
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    # Median heuristic: a bandwidth at the typical distance, neither flat nor a spike.
    scale = np.median(d2[np.triu_indices(size, 1)]) or 1.0
    kernel = np.exp(-d2 / (2.0 * scale))
    # Column 0 marks x as it is; each other column, a random relabelling of the pooled rows.
    rng = np.random.default_rng(seed)
    marks = np.zeros((size, permutations + 1))
    marks[:m, 0] = 1.0
    for col in range(1, permutations + 1):
        marks[rng.permutation(size)[:m], col] = 1.0
    # All statistics at once: sums of the kernel within and across the two sides.
    xx = (marks * (kernel @ marks)).sum(axis=0)
    x_all = marks.T @ kernel.sum(axis=1)
    xy, yy = x_all - xx, kernel.sum() - 2.0 * x_all + xx
    # The kernel's diagonal is 1: leaving it out makes the estimate unbiased.
    stats = (xx - m) / (m * (m - 1)) + (yy - n) / (n * (n - 1)) - 2.0 * xy / (m * n)
    p = (1.0 + np.count_nonzero(stats[1:] >= stats[0])) / (1.0 + permutations)
    return float(stats[0]), float(p)


def _histogram(reference: np.ndarray, batch: np.ndarray, edges: np.ndarray) -> Histogram:
    def shares(values: np.ndarray) -> list[float]:
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        return (counts / max(len(values), 1)).tolist()

    return Histogram(edges.tolist(), shares(reference), shares(batch))


def _knn_edges(reference: Reference, distances: np.ndarray) -> np.ndarray:
    # The batch's 99th percentile, not its maximum: one far outlier would squash every bar.
    top = max(reference.knn_distances.max(initial=0.0), reference.knn_threshold)
    if len(distances):
        top = max(top, float(np.percentile(distances, 99)))
    return np.linspace(0.0, top * 1.05 or 1.0, HIST_BINS + 1)


def _reasons(r: dict, t: DriftConfig) -> list[str]:
    """What crossed its threshold, in words with the numbers."""
    out = []
    if r["unfamiliar_share"] > t.unfamiliar_share:
        out.append(
            f"unfamiliar images: {r['unfamiliar_share']:.1%} > {t.unfamiliar_share:.0%} lie "
            f"farther than {r['knn_threshold']:.3g} from the training embeddings"
        )
    if r["mmd_p"] is not None and r["mmd_p"] < t.alpha:
        out.append(f"embedding shift: MMD^2 {r['mmd2']:.3g}, p {r['mmd_p']:.3g} < {t.alpha}")
    # Both, as with KS: the p-value alone flags trivial changes in a large batch, the
    # distance alone the sampling noise of a small one.
    if (r["js_distance"] or 0) > t.js_distance and r["chi2_p"] < t.alpha:
        out.append(
            f"class mix: Jensen-Shannon distance {r['js_distance']:.3f} > {t.js_distance}, "
            f"chi-square p {r['chi2_p']:.3g} < {t.alpha}"
        )
    if r["ks_p"] is not None and r["ks_p"] < t.alpha and r["ks_statistic"] > t.ks_statistic:
        out.append(
            f"confidences: KS statistic {r['ks_statistic']:.3f} > {t.ks_statistic}, "
            f"p {r['ks_p']:.3g} < {t.alpha}"
        )
    return out


def _accuracy(confidences: np.ndarray, unfamiliar: np.ndarray) -> dict:
    """Mean confidence over the familiar images, and the range it spans when each
    unfamiliar image may be anything from always wrong to always right."""
    u = float(unfamiliar.mean()) if len(unfamiliar) else 0.0
    est = float(confidences[~unfamiliar].mean()) if (~unfamiliar).any() else None
    low = 0.0 if est is None else (1.0 - u) * est
    high = 1.0 if est is None else low + u
    return {"unfamiliar_share": u, "expected_accuracy": est, "range_low": low, "range_high": high}


def _checked(reference: Reference, pred_classes, confidences, embeddings, reduced: bool):
    classes = np.asarray(pred_classes, dtype=np.int64).ravel()
    conf = np.asarray(confidences, dtype=np.float64).ravel()
    emb = np.asarray(embeddings) if reduced else reference.reduction.reduce(embeddings)
    if not len(classes) == len(conf) == len(emb):
        raise ValueError(f"{len(classes)} classes, {len(conf)} confidences, {len(emb)} rows")
    if len(classes) and (classes.min() < 0 or classes.max() >= len(reference.class_mix)):
        raise ValueError(f"predicted classes must lie in [0, {len(reference.class_mix)})")
    return classes, conf, emb


def _measure(reference: Reference, classes, conf, emb, limit: int, permutations: int, seed: int):
    """Every figure of the report bar the verdict and accuracy; each image's kNN distance."""
    n = len(classes)
    distances = knn_distance(emb, reference.embeddings, reference.k) if n else np.zeros(0)
    chi2_p, js, batch_mix = class_mix_test(reference.class_mix, classes)
    ks = ks_2samp(conf, reference.confidences) if n else None
    mmd2 = mmd_p = None
    if n >= 2:
        rng = np.random.default_rng(seed)
        x, y = (a[np.sort(rng.permutation(len(a))[:limit])] for a in (reference.embeddings, emb))
        mmd2, mmd_p = mmd_test(x, y, permutations, seed)
    figures = {
        "chi2_p": chi2_p,
        "js_distance": js,
        "ks_statistic": None if ks is None else float(ks.statistic),
        "ks_p": None if ks is None else float(ks.pvalue),
        "mmd2": mmd2,
        "mmd_p": mmd_p,
        "knn_threshold": reference.knn_threshold,
        "reference_mix": np.asarray(reference.class_mix, dtype=np.float64).tolist(),
        "batch_mix": np.asarray(batch_mix, dtype=np.float64).tolist(),
        "confidence_hist": _histogram(
            reference.confidences, conf, np.linspace(0, 1, HIST_BINS + 1)
        ),
        "knn_hist": _histogram(
            reference.knn_distances, distances, _knn_edges(reference, distances)
        ),
    }
    return figures, distances


def drift_report(
    reference: Reference,
    pred_classes: np.ndarray,
    confidences: np.ndarray,
    embeddings: np.ndarray,
    thresholds: DriftConfig | None = None,
    seed: int = 0,
    reduced: bool = False,
) -> tuple[DriftReport, np.ndarray]:
    """A batch's drift against ``reference``, and which of its images are unfamiliar.

    Drifted: at least ``min_images`` images and any of: unfamiliar share above its threshold;
    MMD p below alpha; JS distance above its threshold with chi-square p below alpha; KS p
    below alpha with a KS statistic above its threshold.

    Args:
        pred_classes: (n,) predicted class index of each image.
        confidences: (n,) calibrated confidence of each prediction.
        embeddings: (n, D) raw penultimate-layer embeddings (reduced here), or with
            ``reduced`` already through the reference's PCA (as scoring writes them).
        thresholds: Defaults to ``DriftConfig()`` (which also sets the MMD test's size).
        seed: Seed of the MMD test's samples and permutations.

    Returns:
        The report, and a boolean (n,) array: True where the image is unfamiliar.
    """
    t = thresholds or DriftConfig()
    classes, conf, emb = _checked(reference, pred_classes, confidences, embeddings, reduced)
    figures, distances = _measure(
        reference, classes, conf, emb, t.max_mmd_samples, t.permutations, seed
    )
    unfamiliar = distances > reference.knn_threshold
    acc = _accuracy(conf, unfamiliar)
    reasons = _reasons(figures | acc, t)
    if len(classes) < t.min_images:
        reasons = [f"{len(classes)} images: drift needs at least {t.min_images}"]
    verdict = "too few to tell" if len(classes) < t.min_images else "drift" if reasons else "ok"
    report = DriftReport(
        verdict=verdict,
        drifted=verdict == "drift",
        reasons=reasons,
        n_images=len(classes),
        headline=acc["range_low"] if verdict == "drift" else acc["expected_accuracy"],
        **figures,
        **acc,
    )
    return report, unfamiliar


def drift_png(report: DriftReport, class_names: list[str] | None = None) -> bytes:
    """Class mix, confidences and kNN distances, reference against batch, in one PNG."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    classes = np.arange(len(report.reference_mix))
    axes[0].bar(classes - 0.2, report.reference_mix, width=0.4, label="reference")
    axes[0].bar(classes + 0.2, report.batch_mix, width=0.4, label="batch")
    axes[0].set(title="predicted class mix", ylabel="share of images")
    if class_names is not None and len(class_names) <= 40:
        axes[0].set_xticks(classes, class_names, rotation=90)
    knn = f"distance to the training embeddings ({report.unfamiliar_share:.1%} unfamiliar)"
    hists = (report.confidence_hist, report.knn_hist)
    for ax, hist, what in zip(axes[1:], hists, ("calibrated confidence", knn), strict=True):
        ax.stairs(hist.reference, hist.edges, fill=True, alpha=0.4, label="reference")
        ax.stairs(hist.batch, hist.edges, lw=2, label="batch")
        ax.set(title=what, ylabel="share of images")
    axes[2].axvline(report.knn_threshold, color="red", ls="--", label="unfamiliar past here")
    for ax in axes:
        ax.legend(fontsize=8)
    head = "n/a" if report.headline is None else f"{report.headline:.1%}"
    fig.suptitle(
        f"{report.verdict}: {report.n_images} images, expected accuracy {head} "
        f"(range {report.range_low:.1%} to {report.range_high:.1%})"
    )
    if report.reasons:
        fig.text(0.01, -0.02, "\n".join(report.reasons), fontsize=9, va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
