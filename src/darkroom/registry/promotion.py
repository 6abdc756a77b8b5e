"""The promotion stage: measure a candidate and the champion on the same holdout, apply the
gate's rules, record the decision beside the candidate, and move the champion pointer only
when the rules say so (one conditional write, through ``registry``).

The rules themselves are in ``darkroom.registry.gate``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data.fetch import local_paths
from darkroom.data.index import read_index
from darkroom.data.labels import DatasetError
from darkroom.model import metrics as mx
from darkroom.model.inference import align_probs, load_version
from darkroom.registry import pointer as registry
from darkroom.registry.evaluation import CandidateMetrics, write_metrics
from darkroom.registry.gate import Decision, Holdout, decide
from darkroom.storage import Storage

log = logging.getLogger(__name__)

# The holdout metrics a promotion record, an event and the UI show.
METRICS_SHOWN = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss")


@dataclass
class Outcome:
    """What the promotion stage did with a candidate."""

    version: str
    promoted: bool
    decision: Decision
    holdout: dict
    champion_holdout: dict | None = None
    champion_version: str | None = None


def evaluate_holdout(
    storage: Storage, config: RetrainConfig, snapshot: str, version: str
) -> Holdout:
    """Metrics and per-image correctness of model ``version`` on the holdout rows of
    ``snapshot`` (classes of the snapshot; a class the model does not know counts as a miss)."""
    df, classes, _ = read_index(storage, snapshot)
    rows = df[df["split"] == "holdout"]
    if rows.empty:
        raise DatasetError("the holdout is empty: add more labeled images")
    loaded = load_version(storage, version, config.device)
    paths = local_paths(storage, rows, config.cache_path(storage.uri))
    probs, _ = loaded.predict_proba(paths, tta=config.tta, max_pixels=config.max_image_pixels)
    probs = align_probs(probs, loaded.classes, classes)
    y_true = rows["class_index"].to_numpy()
    # the top class the metrics score: their row normalisation keeps each row's argmax
    correct = (probs.argmax(1) == y_true).tolist()
    return Holdout(mx.classification_metrics(y_true, probs, classes), correct)


def judge(storage: Storage, config: RetrainConfig, snapshot: str, version: str) -> Outcome:
    """Evaluates ``version`` and the current champion on ``snapshot``'s holdout and applies
    the rules; moves nothing. The outcome keeps both models' metrics; the per-image results
    stay here, summed up in the decision's discordant counts."""
    champion, _ = registry.read_champion(storage)
    champion_version = champion.version if champion else None
    holdout = evaluate_holdout(storage, config, snapshot, version)
    champion_holdout = None
    if champion_version and champion_version != version:
        champion_holdout = evaluate_holdout(storage, config, snapshot, champion_version)
    decision = decide(holdout, champion_holdout, config)
    old = champion_holdout.metrics if champion_holdout else None
    return Outcome(version, False, decision, holdout.metrics, old, champion_version)


def record_candidate(storage: Storage, outcome: Outcome, folds: list[dict]) -> CandidateMetrics:
    """Writes metrics.json and decision.json of the candidate (before any pointer moves).

    Args:
        folds: each fold's validation metrics, in fold order.
    """
    metrics = CandidateMetrics(folds, mx.aggregate(folds), outcome.holdout)
    write_metrics(storage, outcome.version, metrics)
    storage.write_json(layout.version(outcome.version, "decision.json"), decision_record(outcome))
    return metrics


def decision_record(outcome: Outcome) -> dict:
    """decision.json: the rule's verdict and both models' holdout metrics."""
    return {
        **asdict(outcome.decision),
        "champion_version": outcome.champion_version,
        "champion_holdout": outcome.champion_holdout,
        "challenger_holdout": outcome.holdout,
    }


def promote_candidate(storage: Storage, outcome: Outcome, action: str = "promote") -> Outcome:
    """Moves the champion pointer to the candidate when the decision says so: one conditional
    write against the pointer as it was when the champion was measured. A promotion that lost
    a race reports it in the rule and writes nothing."""
    if not outcome.decision.promote:
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
        )
    except registry.PromotionLost as e:
        log.warning("%s", e)
        decision.rule += f"; lost the race: {e}"
        return outcome
    outcome.promoted = True
    return outcome
