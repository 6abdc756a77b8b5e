"""The promotion stage: measure a candidate and the champion on the same holdout, apply the
gate's rule, record the decision beside the candidate, and move the champion pointer only when
the rule says so (one conditional write, through ``registry``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from darkroom import layout, registry
from darkroom import metrics as mx
from darkroom.config import RetrainConfig
from darkroom.index import DatasetError, read_index
from darkroom.inference import align_probs, load_version
from darkroom.storage import Storage
from darkroom.sync import local_paths

log = logging.getLogger(__name__)

# The holdout metrics a promotion record, an event and the UI show.
METRICS_SHOWN = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss")


@dataclass
class Decision:
    """The gate's verdict on two models' metrics from the same holdout."""

    promote: bool
    rule: str
    metric: str
    challenger: float
    champion: float | None
    min_delta: float
    max_class_recall_drop: float
    per_class_recall: dict = field(default_factory=dict)
    recall_drops: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """What the promotion stage did with a candidate."""

    version: str
    promoted: bool
    decision: Decision
    holdout: dict
    champion_holdout: dict | None = None
    champion_version: str | None = None


def evaluate_holdout(storage: Storage, config: RetrainConfig, snapshot: str, version: str) -> dict:
    """Metrics of model ``version`` on the holdout rows of ``snapshot`` (classes of the
    snapshot; a class the model does not know counts as a miss)."""
    df, classes, _ = read_index(storage, snapshot)
    rows = df[df["split"] == "holdout"]
    if rows.empty:
        raise DatasetError("the holdout is empty: add more labeled images")
    loaded = load_version(storage, version, config.device)
    paths = local_paths(storage, rows, config.cache_path(storage))
    probs, _ = loaded.predict_proba(paths, tta=config.tta)
    probs = align_probs(probs, loaded.classes, classes)
    return mx.classification_metrics(rows["class_index"].to_numpy(), probs, classes)


def _per_class_recall(challenger: dict, champion: dict | None) -> dict:
    new = challenger.get("per_class_accuracy", {})
    old = (champion or {}).get("per_class_accuracy", {})
    return {c: {"challenger": r, "champion": old.get(c)} for c, r in new.items()}


def _recall_drops(per_class: dict, limit: float) -> dict:
    return {
        c: v["champion"] - v["challenger"]
        for c, v in per_class.items()
        if v["challenger"] is not None
        and v["champion"] is not None
        and v["champion"] - v["challenger"] > limit + 1e-12
    }


def decide(
    challenger: dict,
    champion: dict | None,
    metric: str,
    min_delta: float = 0.0,
    max_class_recall_drop: float = 1.0,
) -> Decision:
    """The gate's rule: promote when there is no champion, or when the challenger's ``metric``
    beats the champion's by at least ``min_delta`` (and by more than nothing) and no class's
    recall falls by more than ``max_class_recall_drop``."""
    new = challenger[metric]
    old = champion[metric] if champion else None
    d = Decision(False, "", metric, new, old, min_delta, max_class_recall_drop)
    d.per_class_recall = _per_class_recall(challenger, champion)
    if champion is None:
        d.promote, d.rule = True, "no champion yet"
        return d
    d.recall_drops = drops = _recall_drops(d.per_class_recall, max_class_recall_drop)
    gain = new - old
    if gain <= 0 or gain < min_delta:
        d.rule = (
            f"rejected: challenger {metric} {new:.4f} does not beat champion {old:.4f} by "
            f"at least {min_delta:g} (gain {gain:+.4f}) on the same holdout"
        )
    elif drops:
        worst = max(drops, key=drops.get)
        also = sorted(set(drops) - {worst})
        d.rule = (
            f"rejected: recall of class {worst!r} fell by {drops[worst]:.4f} "
            f"(> {max_class_recall_drop:g}) although {metric} rose {old:.4f} -> {new:.4f}"
            + (f"; also {also}" if also else "")
        )
    else:
        d.promote = True
        d.rule = (
            f"promoted: challenger {metric} {new:.4f} beats champion {old:.4f} by "
            f"{gain:+.4f} (>= {min_delta:g}); no class recall fell by more than "
            f"{max_class_recall_drop:g}"
        )
    return d


def judge(storage: Storage, config: RetrainConfig, snapshot: str, version: str) -> Outcome:
    """Evaluates ``version`` and the current champion on ``snapshot``'s holdout and applies
    the rule; moves nothing."""
    champion, _ = registry.read_champion(storage)
    champion_version = champion["version"] if champion else None
    holdout = evaluate_holdout(storage, config, snapshot, version)
    champion_holdout = None
    if champion_version and champion_version != version:
        champion_holdout = evaluate_holdout(storage, config, snapshot, champion_version)
    decision = decide(
        holdout,
        champion_holdout,
        config.train.metric,
        config.min_delta,
        config.max_class_recall_drop,
    )
    return Outcome(version, False, decision, holdout, champion_holdout, champion_version)


def record_candidate(storage: Storage, outcome: Outcome, folds: list[dict]) -> dict:
    """Writes metrics.json and decision.json of the candidate (before any pointer moves).

    Args:
        folds: each fold's validation metrics, in fold order.
    """
    metrics = {"folds": folds, "cv": mx.aggregate(folds), "holdout": outcome.holdout}
    storage.write_json(layout.version(outcome.version, "metrics.json"), metrics)
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
    current = champion["version"] if champion else None
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
