"""A candidate's measured metrics, as ``models/<version>/metrics.json`` keeps them: each fold's
validation metrics, their mean and spread (cross-validation), and the holdout's.

The promotion stage writes it; the CLI, the model card and the champion's history read it
through ``read_metrics``, by attribute."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from darkroom import layout
from darkroom.storage import Storage


@dataclass(frozen=True)
class CandidateMetrics:
    """metrics.json: ``folds`` (each fold's metrics), ``cv`` (metric -> mean, std, per fold)
    and ``holdout`` (metric -> value, plus the confusion matrix and per-class figures)."""

    folds: list[dict] = field(default_factory=list)
    cv: dict = field(default_factory=dict)
    holdout: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def headline(self, names=("accuracy", "f1_macro")) -> dict[str, float]:
        """The holdout figures a promotion record carries."""
        return {k: self.holdout[k] for k in names if k in self.holdout}


def write_metrics(storage: Storage, version: str, metrics: CandidateMetrics) -> None:
    storage.write_json(layout.version(version, "metrics.json"), metrics.as_dict())


def read_metrics(storage: Storage, version: str) -> CandidateMetrics | None:
    """The version's metrics, or None for a version not judged yet."""
    found = storage.read_json(layout.version(version, "metrics.json"), missing_ok=True)
    return CandidateMetrics(**found) if found else None
