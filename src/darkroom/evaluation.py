"""The promotion gate's measurements: a model version on the current holdout, and the
candidate's metrics and decision files."""

from __future__ import annotations

from darkroom import index as idx
from darkroom import metrics as mx
from darkroom import registry, scoring
from darkroom.storage import open_storage
from darkroom.sync import local_paths


def evaluate_holdout(
    storage_uri: str,
    cache_dir: str,
    snapshot: str,
    version: str,
    device: str = "auto",
    batch_size: int = 64,
    tta: bool = False,
) -> dict:
    """Metrics of model ``version`` on the holdout rows of ``snapshot`` (classes of the
    snapshot; a class the model does not know counts as a miss)."""
    storage = open_storage(storage_uri)
    df, classes, _ = idx.read_index(storage, snapshot)
    rows = df[df["split"] == "holdout"]
    if rows.empty:
        raise idx.DatasetError("the holdout is empty: add more labeled images")
    loaded = scoring.load_version(storage, version, device)
    probs, _ = loaded.predict_proba(local_paths(storage, rows, cache_dir), batch_size, tta=tta)
    probs = scoring.align_probs(probs, loaded.classes, classes)
    return mx.classification_metrics(rows["class_index"].to_numpy(), probs, classes)


def record_candidate(
    storage_uri: str,
    version: str,
    fold_summaries: list[dict],
    holdout: dict,
    champion_holdout: dict | None,
    decision: dict,
) -> dict:
    """Writes metrics.json and decision.json of the candidate (before any pointer moves)."""
    storage = open_storage(storage_uri)
    folds = [s["metrics"] for s in sorted(fold_summaries, key=lambda s: s["fold"])]
    metrics = {"folds": folds, "cv": mx.aggregate(folds), "holdout": holdout}
    registry.write_json(storage, registry.version_key(version, "metrics.json"), metrics)
    registry.write_json(
        storage,
        registry.version_key(version, "decision.json"),
        {**decision, "champion_holdout": champion_holdout, "challenger_holdout": holdout},
    )
    return metrics


def gate(
    storage_uri: str,
    cache_dir: str,
    version: str,
    *,
    metric: str = "accuracy",
    min_delta: float = 0.0,
    max_class_recall_drop: float = 1.0,
    device: str = "auto",
    tta: bool = False,
) -> dict:
    """Runs the promotion gate for an existing ``version`` against the current champion on
    the latest index's holdout (images missing from the cache are fetched). Returns the
    decision."""
    storage = open_storage(storage_uri)
    if not storage.exists(registry.version_key(version, "model.json")):
        raise registry.RegistryError(f"no model version {version!r} in {storage.url('models/')}")
    _, _, snapshot = idx.read_index(storage)
    challenger = evaluate_holdout(storage_uri, cache_dir, snapshot, version, device, tta=tta)
    champion, _ = registry.read_champion(storage)
    champion_holdout = None
    if champion:
        champion_holdout = evaluate_holdout(
            storage_uri, cache_dir, snapshot, champion["version"], device, tta=tta
        )
    decision = registry.decide(
        challenger, champion_holdout, metric, min_delta, max_class_recall_drop
    )
    return {
        **decision,
        "index_snapshot": snapshot,
        "champion_version": champion and champion["version"],
        "challenger_holdout": challenger,
        "champion_holdout": champion_holdout,
    }
