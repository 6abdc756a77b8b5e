"""The promotion stage: measure a candidate and the champion on the same holdout, apply the
gate's rules, record the decision beside the candidate, and move the champion pointer only
when the rules say so (one conditional write, through ``registry``).

The rules themselves are in ``darkroom.registry.gate``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data.fetch import local_paths
from darkroom.data.index import read_index
from darkroom.data.labels import DatasetError
from darkroom.model import metrics as mx
from darkroom.model.calibration import apply_temperature
from darkroom.model.inference import align_probs, load_version
from darkroom.registry import pointer as registry
from darkroom.registry.calibrating import calibrate_candidate
from darkroom.registry.card import write_card
from darkroom.registry.evaluation import CandidateMetrics, write_metrics
from darkroom.registry.gate import Decision, Holdout, decide
from darkroom.storage import Storage

log = logging.getLogger(__name__)

# The holdout metrics a promotion record, an event and the UI show.
METRICS_SHOWN = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss", "ece")
# A person's answers to a candidate (RetrainConfig.require_approval).
PENDING, APPROVED, REJECTED, TIMED_OUT = "pending", "approved", "rejected", "timed out"
NOT_ASKED = "not asked"  # the gate rejected the candidate: approval never overrides it


@dataclass
class Approval:
    """A person's answer to a candidate the gate accepted, where the retrain asks for one.

    Attributes:
        answer: PENDING (asked, no answer yet), APPROVED, REJECTED, TIMED_OUT (no answer
            within ``timeout_seconds``) or NOT_ASKED (the gate rejected the candidate).
        note: what the person wrote.
        at: when the answer came (ISO 8601, UTC); empty while pending.
        timeout_seconds: how long the run waited for it at most.
    """

    answer: str
    note: str = ""
    at: str = ""
    timeout_seconds: int | None = None


@dataclass
class Outcome:
    """What the promotion stage did with a candidate."""

    version: str
    promoted: bool
    decision: Decision
    holdout: dict
    champion_holdout: dict | None = None
    champion_version: str | None = None
    calibration: dict | None = None  # the candidate's temperature and its scores
    approval: Approval | None = None  # a person's answer, where one was asked for

    def cleared(self) -> bool:
        """The gate promotes the candidate and, where a person was asked, they approved."""
        return self.decision.promote and (self.approval is None or self.approval.answer == APPROVED)


def holdout_probs(
    storage: Storage, config: RetrainConfig, snapshot: str, version: str, calibrated: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Model ``version``'s class probabilities on the holdout rows of ``snapshot`` (columns:
    the snapshot's classes; a class the model does not know gets 0), the labels, the classes.
    ``calibrated``: with the version's temperature."""
    df, classes, _ = read_index(storage, snapshot)
    rows = df[df["split"] == "holdout"]
    if rows.empty:
        raise DatasetError("the holdout is empty: add more labeled images")
    loaded = load_version(storage, version, config.device)
    paths = local_paths(storage, rows, config.cache_path(storage.uri))
    probs, _ = loaded.predict_proba(
        paths, tta=config.tta, max_pixels=config.max_image_pixels, calibrated=calibrated
    )
    return align_probs(probs, loaded.classes, classes), rows["class_index"].to_numpy(), classes


def holdout_result(probs: np.ndarray, y_true: np.ndarray, classes: list[str]) -> Holdout:
    """Metrics and per-image correctness of one model's holdout probabilities."""
    # the top class the metrics score: their row normalisation keeps each row's argmax
    correct = (probs.argmax(1) == y_true).tolist()
    return Holdout(mx.classification_metrics(y_true, probs, classes), correct)


def evaluate_holdout(
    storage: Storage, config: RetrainConfig, snapshot: str, version: str
) -> Holdout:
    """Metrics and per-image correctness of model ``version`` (with its temperature) on the
    holdout rows of ``snapshot``."""
    return holdout_result(*holdout_probs(storage, config, snapshot, version))


def judge(storage: Storage, config: RetrainConfig, snapshot: str, version: str) -> Outcome:
    """Calibrates ``version`` (its temperature, checked on the holdout), then evaluates it and
    the current champion on ``snapshot``'s holdout and applies the rules; moves nothing. The
    outcome keeps both models' metrics (calibrated); the per-image results stay here, summed
    up in the decision's discordant counts."""
    champion, _ = registry.read_champion(storage)
    champion_version = champion.version if champion else None
    raw, y_true, classes = holdout_probs(storage, config, snapshot, version, calibrated=False)
    calibration = calibrate_candidate(storage, version, raw, y_true)
    probs = apply_temperature(np.log(np.clip(raw, 1e-12, None)), calibration["temperature"])
    holdout = holdout_result(probs, y_true, classes)
    champion_holdout = None
    if champion_version and champion_version != version:
        champion_holdout = evaluate_holdout(storage, config, snapshot, champion_version)
    decision = decide(holdout, champion_holdout, config)
    old = champion_holdout.metrics if champion_holdout else None
    return Outcome(version, False, decision, holdout.metrics, old, champion_version, calibration)


def record_candidate(storage: Storage, outcome: Outcome, folds: list[dict]) -> CandidateMetrics:
    """Writes metrics.json and decision.json of the candidate (before any pointer moves).

    Args:
        folds: each fold's validation metrics, in fold order.
    """
    metrics = CandidateMetrics(folds, mx.aggregate(folds), outcome.holdout)
    write_metrics(storage, outcome.version, metrics)
    write_decision(storage, outcome)
    write_card(storage, outcome.version)
    return metrics


def write_decision(storage: Storage, outcome: Outcome) -> None:
    """decision.json of the candidate, as the outcome stands (again after a person answers)."""
    storage.write_json(layout.version(outcome.version, "decision.json"), decision_record(outcome))


def decision_record(outcome: Outcome) -> dict:
    """decision.json: the rule's verdict, both models' holdout metrics (calibrated, ECE
    included), the candidate's temperature and a person's answer (None: none was asked for)."""
    return {
        **asdict(outcome.decision),
        "champion_version": outcome.champion_version,
        "champion_holdout": outcome.champion_holdout,
        "challenger_holdout": outcome.holdout,
        "calibration": outcome.calibration,
        "approval": asdict(outcome.approval) if outcome.approval else None,
    }


def promote_candidate(storage: Storage, outcome: Outcome, action: str = "promote") -> Outcome:
    """Moves the champion pointer to the candidate when the decision says so (and the person
    asked, if any, approved): one conditional write against the pointer as it was when the
    champion was measured. A promotion that lost a race reports it in the rule and writes
    nothing."""
    if not outcome.cleared():
        return outcome
    champion, etag = registry.read_champion(storage)
    current = champion.version if champion else None
    decision = outcome.decision
    if current == outcome.version:  # a retry after the pointer moved
        outcome.promoted = True
        return outcome
    if current != outcome.champion_version:
        decision.rule += f"; lost the race: the champion became {current} meanwhile"
        log.warning("%s not promoted: the champion became %s meanwhile", outcome.version, current)
        return outcome
    try:
        registry.promote(
            storage,
            outcome.version,
            expected_etag=etag,
            action=action,
            reason=decision.rule,
            previous=current,
            metrics={m: outcome.holdout[m] for m in METRICS_SHOWN if m in outcome.holdout},
            approval=asdict(outcome.approval) if outcome.approval else None,
        )
    except registry.PromotionLost as e:
        log.warning("%s", e)
        decision.rule += f"; lost the race: {e}"
        return outcome
    outcome.promoted = True
    return outcome
