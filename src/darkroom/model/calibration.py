"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One temperature T divides the logits before the softmax: the argmax never changes, only how sure
the probabilities claim to be. T is fitted on the out-of-fold predictions and checked on the
holdout, which the fit never saw: if the holdout gets worse, T = 1 is kept, with the reason.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

# A probability of exactly 0 has log -inf; the floor keeps the NLL finite, no realistic one moves.
PROB_FLOOR = 1e-12
LOG_FLOOR = math.log(PROB_FLOOR)
# A temperature fitted on predictions with (almost) no mistakes runs to its lower bound: the NLL
# of rows that are all right only falls as T sharpens them. Below this many mistakes the fit says
# nothing about the model's errors, so T stays 1 (the demo's chosen fold had none at all).
MIN_MISTAKES = 5


@dataclass(frozen=True)
class CalibrationScores:
    """How well probabilities match outcomes on one set of rows.

    Attributes:
        ece: Expected calibration error of the top-1 confidence (equal-width bins).
        nll: Mean negative log-likelihood of the true class.
        brier: Multi-class Brier score: mean over rows of the squared distance to the one-hot label.
        accuracy: Share of rows whose argmax is the true class.
        n: Number of rows.
    """

    ece: float
    nll: float
    brier: float
    accuracy: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready copy."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationScores:
        """Inverse of `as_dict`."""
        return cls(**{f.name: d[f.name] for f in fields(cls)})


@dataclass(frozen=True, eq=False)
class Reliability:
    """Per-bin data of a reliability diagram; bin k holds confidences in (lower[k], upper[k]].

    Attributes:
        lower: Lower edge of each bin.
        upper: Upper edge of each bin.
        count: Rows whose top-1 confidence falls in the bin.
        accuracy: Share of those rows predicted right (NaN for an empty bin).
        confidence: Their mean top-1 confidence (NaN for an empty bin).
    """

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray

    @property
    def ece(self) -> float:
        """Sum over bins of |accuracy - confidence| weighted by the bin's share of rows."""
        full = self.count > 0  # an empty bin has NaN accuracy and weighs nothing
        gaps = np.abs(self.accuracy[full] - self.confidence[full])
        return float(np.sum(self.count[full] * gaps) / max(int(self.count.sum()), 1))


@dataclass(frozen=True)
class Calibration:
    """The temperature to apply, and the evidence for it.

    The `*_after` scores are those of the fitted temperature (the candidate the guard judged);
    when `kept_identity` is true the probabilities shipped are the `*_before` ones.

    Attributes:
        temperature: What to divide the logits by: `fitted_temperature`, or 1.0 if kept_identity.
        fitted_temperature: The temperature minimising the out-of-fold NLL.
        kept_identity: True when the holdout got worse with the fitted temperature.
        reason: One sentence saying why this temperature was chosen.
        oof_before: Out-of-fold scores at T = 1.
        oof_after: Out-of-fold scores at the fitted temperature.
        holdout_before: Holdout scores at T = 1 (None without a holdout).
        holdout_after: Holdout scores at the fitted temperature (None without a holdout).
    """

    temperature: float
    fitted_temperature: float
    kept_identity: bool
    reason: str
    oof_before: CalibrationScores
    oof_after: CalibrationScores
    holdout_before: CalibrationScores | None = None
    holdout_after: CalibrationScores | None = None

    def as_dict(self) -> dict:
        """JSON-ready copy (for model.json or a report)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Inverse of `as_dict`."""
        kept = {f.name: d.get(f.name) for f in fields(cls)}
        for key in ("oof_before", "oof_after", "holdout_before", "holdout_after"):
            if kept[key] is not None:
                kept[key] = CalibrationScores.from_dict(kept[key])
        return cls(**kept)


def _matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected an (n, classes) array, got shape {x.shape}")
    return x


def _rows(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (n, classes) matrix as float64 and its n labels as int64, both checked."""
    x = _matrix(x)
    y = np.asarray(labels)
    if y.shape != (len(x),):
        raise ValueError(f"expected {len(x)} labels, got shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= x.shape[1]):
        raise ValueError(f"labels must lie in [0, {x.shape[1]})")
    return x, y.astype(np.int64)


def _logits(log_probs: np.ndarray) -> np.ndarray:
    """Float64 logits minus their row maximum, -inf (probability 0) raised to the floor."""
    x = _matrix(log_probs)
    top = x.max(axis=1, keepdims=True)  # NaN and +inf anywhere in a row reach its maximum
    if not np.isfinite(top).all():
        raise ValueError("logits must not be NaN or +inf, nor a whole row -inf")
    # The shift changes no softmax; flooring relative to it treats logits and log-probs alike.
    return np.maximum(x - top, LOG_FLOOR)


def _nll(log_t: float, z: np.ndarray, labels: np.ndarray) -> float:
    scaled = z / math.exp(log_t)
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(z)), labels]))


def fit_temperature(
    log_probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature minimising the NLL of softmax(log_probs / T).

    Args:
        log_probs: (n, classes) log-probabilities or logits (a per-row constant cancels).
        labels: The n true class indices.
        bounds: Smallest and largest temperature considered.

    Returns:
        T within bounds; >1 softens overconfident predictions, <1 sharpens underconfident ones.
    """
    z, labels = _rows(_logits(log_probs), labels)
    if len(z) == 0:
        raise ValueError("cannot fit a temperature on no rows")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    # Searching log T makes the scale symmetric: halving and doubling are equally far from 1.
    log_bounds = (math.log(lo), math.log(hi))
    result = minimize_scalar(_nll, bounds=log_bounds, args=(z, labels), method="bounded")
    return float(min(max(math.exp(result.x), lo), hi))


def apply_temperature(log_probs_or_logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of logits / T, computed in float64 and returned as float32 (rows sum to 1)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    e = np.exp(_logits(log_probs_or_logits) / temperature)  # row max 0: no overflow
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> Reliability:
    """Top-1 confidence against accuracy in `bins` equal-width bins over [0, 1]."""
    p, y = _rows(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = p.max(axis=1)
    right = (p.argmax(axis=1) == y).astype(np.float64)
    # Bin k holds (edges[k], edges[k + 1]], as in Guo et al.; a confidence of 0 joins the first.
    which = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(which, weights=right, minlength=bins) / count
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
    return Reliability(edges[:-1], edges[1:], count, acc, mean_conf)


def calibration_scores(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> CalibrationScores:
    """ECE, NLL, Brier score and accuracy of probabilities against the true labels."""
    p, y = _rows(probs, labels)
    n = len(p)
    if n == 0:
        return CalibrationScores(ece=0.0, nll=0.0, brier=0.0, accuracy=0.0, n=0)
    p_true = p[np.arange(n), y]
    return CalibrationScores(
        ece=reliability(p, y, bins).ece,
        nll=float(np.mean(-np.log(np.maximum(p_true, PROB_FLOOR)))),
        # sum_c (p_c - onehot_c)^2 expanded: the one-hot term only touches the true class.
        brier=float(np.mean(np.sum(p**2, axis=1) - 2 * p_true + 1)),
        accuracy=float(np.mean(p.argmax(axis=1) == y)),
        n=n,
    )


def _judge(
    before: CalibrationScores | None, after: CalibrationScores | None, fitted: float
) -> tuple[bool, str]:
    """Whether to keep T = 1 (the holdout got worse with the fitted T), and why."""
    if before is None or after is None:
        return False, f"no holdout to check it on: fitted T = {fitted:.3f} applied"
    # NLL first: it is what the fit minimised, so a rise there is the plainest sign of overfit.
    for name, was, now in (("NLL", before.nll, after.nll), ("ECE", before.ece, after.ece)):
        if now > was:
            why = f"holdout {name} rose from {was:.4f} to {now:.4f} with T = {fitted:.3f}"
            return True, f"{why}: kept T = 1"
    return False, (
        f"holdout NLL {before.nll:.4f} -> {after.nll:.4f}, "
        f"ECE {before.ece:.4f} -> {after.ece:.4f}: fitted T = {fitted:.3f} applied"
    )


def calibrate(
    oof_log_probs: np.ndarray,
    oof_labels: np.ndarray,
    holdout_log_probs: np.ndarray | None = None,
    holdout_labels: np.ndarray | None = None,
    bins: int = 15,
) -> Calibration:
    """Fit T on the out-of-fold predictions; keep T = 1 if the holdout gets worse with it.

    Args:
        oof_log_probs: (n, classes) out-of-fold log-probabilities or logits.
        oof_labels: Their n true class indices.
        holdout_log_probs: (m, classes) holdout log-probabilities or logits, or None.
        holdout_labels: Their m true class indices, or None.
        bins: Bins of the ECE.

    Returns:
        The temperature to apply and the scores before and after it.
    """
    if (holdout_log_probs is None) != (holdout_labels is None):
        raise ValueError("give both holdout_log_probs and holdout_labels, or neither")
    mistakes = int((np.argmax(oof_log_probs, axis=1) != np.asarray(oof_labels)).sum())
    fitted = fit_temperature(oof_log_probs, oof_labels) if mistakes >= MIN_MISTAKES else 1.0

    def scores(log_probs: np.ndarray, labels: np.ndarray, t: float) -> CalibrationScores:
        return calibration_scores(apply_temperature(log_probs, t), labels, bins)

    holdout = holdout_log_probs is not None and len(holdout_log_probs) > 0
    hold_before = scores(holdout_log_probs, holdout_labels, 1.0) if holdout else None
    hold_after = scores(holdout_log_probs, holdout_labels, fitted) if holdout else None
    kept, reason = _judge(hold_before, hold_after, fitted)
    if mistakes < MIN_MISTAKES:
        kept, reason = (
            True,
            (
                f"only {mistakes} mistakes in the {len(oof_labels)} predictions the fit would use "
                f"(at least {MIN_MISTAKES} needed to fit a temperature): kept T = 1"
            ),
        )
    return Calibration(
        temperature=1.0 if kept else fitted,
        fitted_temperature=fitted,
        kept_identity=kept,
        reason=reason,
        oof_before=scores(oof_log_probs, oof_labels, 1.0),
        oof_after=scores(oof_log_probs, oof_labels, fitted),
        holdout_before=hold_before,
        holdout_after=hold_after,
    )


def _diagram(ax, bins: Reliability, name: str) -> None:
    label, width = f"accuracy (ECE {bins.ece:.3f})", bins.upper - bins.lower
    # An empty bin has no accuracy: drawn as no bar rather than a bar of NaN.
    heights = np.nan_to_num(bins.accuracy)
    ax.bar(bins.lower, heights, width, align="edge", edgecolor="black", lw=0.5, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
    ax.legend(loc="upper left", fontsize=8)


def reliability_png(before: Reliability, after: Reliability, title: str) -> bytes:
    """Reliability diagrams before and after temperature scaling, side by side, as PNG bytes."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    try:
        _diagram(axes[0], before, "before")
        _diagram(axes[1], after, "after")
        fig.suptitle(title)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)
