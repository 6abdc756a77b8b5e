"""Model versions, the champion pointer and the promotion log.

Layout: ``models/<version>/`` (model.safetensors, model.json, metrics.json, oof.parquet,
plots, folds/<k>/...), ``models/champion.json`` (pointer, written last, conditionally), and
``models/promotions/<timestamp>-<version>.json`` (append-only records).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from darkroom.storage import PreconditionFailed, Storage

CHAMPION = "models/champion.json"
PROMOTIONS = "models/promotions/"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked; the message says why."""


class PromotionLost(RegistryError):
    """Another promotion changed the champion pointer first; nothing was written."""


def version_key(version: str, name: str = "") -> str:
    return f"models/{version}/{name}"


def new_version(snapshot: str, config_fingerprint: str) -> str:
    """Deterministic for a snapshot and config, so a rerun finds the folds it already trained."""
    return f"{snapshot[:8]}-{config_fingerprint[:8]}"


def read_json(storage: Storage, key: str) -> dict | None:
    try:
        return json.loads(storage.read_text(key))
    except FileNotFoundError:
        return None


def write_json(storage: Storage, key: str, obj, **kw) -> str:
    return storage.write_text(key, json.dumps(obj, indent=2, default=str), **kw)


def read_champion(storage: Storage) -> tuple[dict | None, str | None]:
    """The champion pointer and its etag (for the conditional write that replaces it)."""
    etag = storage.etag(CHAMPION)
    if etag is None:
        return None, None
    return json.loads(storage.read_text(CHAMPION)), etag


def decide(
    challenger: dict,
    champion: dict | None,
    metric: str,
    min_delta: float = 0.0,
    max_class_recall_drop: float = 1.0,
) -> dict:
    """The promotion gate, on two models' metrics from the same holdout.

    Promote when there is no champion, or when the challenger's ``metric`` beats the
    champion's by at least ``min_delta`` (and by more than nothing) and no class's recall
    falls by more than ``max_class_recall_drop``.

    Returns:
        The decision: ``promote``, the ``rule`` that decided, both metrics and per-class recall.
    """
    new = challenger[metric]
    new_recall = challenger.get("per_class_accuracy", {})
    base = {
        "metric": metric,
        "challenger": new,
        "min_delta": min_delta,
        "max_class_recall_drop": max_class_recall_drop,
    }
    if champion is None:
        return {
            **base,
            "promote": True,
            "champion": None,
            "rule": "no champion yet",
            "per_class_recall": {
                c: {"challenger": r, "champion": None} for c, r in new_recall.items()
            },
        }
    old = champion[metric]
    old_recall = champion.get("per_class_accuracy", {})
    per_class = {
        c: {"challenger": new_recall.get(c), "champion": old_recall.get(c)} for c in new_recall
    }
    drops = {
        c: v["champion"] - v["challenger"]
        for c, v in per_class.items()
        if v["challenger"] is not None
        and v["champion"] is not None
        and v["champion"] - v["challenger"] > max_class_recall_drop + 1e-12
    }
    gain = new - old
    if gain <= 0 or gain < min_delta:
        promote = False
        rule = (
            f"rejected: challenger {metric} {new:.4f} does not beat champion {old:.4f} by "
            f"at least {min_delta:g} (gain {gain:+.4f}) on the same holdout"
        )
    elif drops:
        promote = False
        worst = max(drops, key=drops.get)
        rule = (
            f"rejected: recall of class {worst!r} fell by {drops[worst]:.4f} "
            f"(> {max_class_recall_drop:g}) although {metric} rose {old:.4f} -> {new:.4f}"
            + (f"; also {sorted(set(drops) - {worst})}" if len(drops) > 1 else "")
        )
    else:
        promote = True
        rule = (
            f"promoted: challenger {metric} {new:.4f} beats champion {old:.4f} by "
            f"{gain:+.4f} (>= {min_delta:g}); no class recall fell by more than "
            f"{max_class_recall_drop:g}"
        )
    return {
        **base,
        "promote": promote,
        "champion": old,
        "rule": rule,
        "per_class_recall": per_class,
        "recall_drops": drops,
    }


def verify(storage: Storage, version: str) -> None:
    """Checks every weights file of ``version`` against the sha256 in its model.json.

    Raises:
        FileNotFoundError: the version or a weights file is missing.
        ValueError: a weights file does not match its recorded hash.
    """
    import hashlib

    if not storage.exists(version_key(version, "model.safetensors")):
        raise FileNotFoundError(f"{storage.url(version_key(version))} has no model.safetensors")
    meta = read_json(storage, version_key(version, "model.json"))
    if meta is None:
        return  # a bare weights file (older layout): nothing recorded to check against
    files = [("model.safetensors", meta.get("sha256"))]
    files += [(m["key"], m["sha256"]) for m in meta.get("ensemble") or []]
    for name, expected in files:
        data = storage.read_bytes(version_key(version, name))
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(
                f"{storage.url(version_key(version, name))} does not match the "
                "sha256 recorded in model.json: it was changed or truncated; "
                "restore it or retrain"
            )


def promote(
    storage: Storage,
    version: str,
    *,
    expected_etag: str | None,
    action: str,
    reason: str,
    metrics: dict | None = None,
    previous: str | None = None,
) -> dict:
    """Points the champion at ``version`` in one conditional write, then logs the record.

    Raises:
        PromotionLost: the pointer changed since ``expected_etag`` was read.
    """
    verify(storage, version)
    now = datetime.now(UTC)
    record = {
        "version": version,
        "action": action,
        "at": now.isoformat(),
        "reason": reason,
        "previous": previous,
        "metrics": metrics or {},
    }
    try:
        if expected_etag is None:
            write_json(storage, CHAMPION, record, if_none_match=True)
        else:
            write_json(storage, CHAMPION, record, if_match=expected_etag)
    except PreconditionFailed as e:
        raise PromotionLost(f"champion pointer changed meanwhile; {version} not promoted") from e
    key = f"{PROMOTIONS}{now:%Y%m%dT%H%M%S%fZ}-{version}.json"
    write_json(storage, key, record, if_none_match=True)
    return record


def history(storage: Storage) -> list[dict]:
    return [json.loads(storage.read_text(o.key)) for o in storage.list(PROMOTIONS)]


def lineage(records: list[dict]) -> list[str]:
    """The chain of champions that rollbacks walk back: promotions push, rollbacks pop."""
    stack: list[str] = []
    for r in records:
        if r["action"] == "rollback":
            while stack and stack[-1] != r["version"]:
                stack.pop()
            if not stack:
                stack.append(r["version"])
        else:
            stack.append(r["version"])
    return stack


def rollback(storage: Storage) -> dict:
    """Points the champion back at the one it replaced (one conditional write + a record).

    Raises:
        RegistryError: there is no champion, or none before it.
        PromotionLost: the pointer changed meanwhile.
    """
    champion, etag = read_champion(storage)
    if champion is None:
        raise RegistryError("no champion yet: nothing to roll back")
    chain = lineage(history(storage))
    if len(chain) < 2 or chain[-1] != champion["version"]:
        raise RegistryError(
            f"no previous champion before {champion['version']} in "
            f"{storage.url(PROMOTIONS)}: nothing to roll back to"
        )
    return promote(
        storage,
        chain[-2],
        expected_etag=etag,
        action="rollback",
        reason=f"rollback from {champion['version']}",
        previous=champion["version"],
        metrics=champion_metrics(storage, chain[-2]),
    )


def champion_metrics(storage: Storage, version: str) -> dict:
    metrics = read_json(storage, version_key(version, "metrics.json")) or {}
    holdout = metrics.get("holdout", {})
    return {k: holdout[k] for k in ("accuracy", "f1_macro") if k in holdout}


def list_versions(storage: Storage) -> list[str]:
    return sorted(
        {
            o.key.split("/")[1]
            for o in storage.list("models/")
            if o.key.endswith("/model.json") and o.key.count("/") == 2
        }
    )
