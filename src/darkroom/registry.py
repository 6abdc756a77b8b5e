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


class PromotionLost(RuntimeError):
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


def decide(challenger: dict, champion: dict | None, metric: str) -> dict:
    """Promote when there is no champion, or the challenger is strictly better on ``metric``
    measured on the same holdout."""
    new = challenger[metric]
    if champion is None:
        return {"promote": True, "metric": metric, "challenger": new, "champion": None,
                "rule": "no champion yet"}
    old = champion[metric]
    better = new > old
    rule = (f"challenger {metric} {new:.4f} {'>' if better else '<='} champion {old:.4f} "
            "on the same holdout")
    return {"promote": better, "metric": metric, "challenger": new, "champion": old, "rule": rule}


def promote(storage: Storage, version: str, *, expected_etag: str | None, action: str,
            reason: str, metrics: dict | None = None, previous: str | None = None) -> dict:
    """Points the champion at ``version`` in one conditional write, then logs the record.

    Raises:
        PromotionLost: the pointer changed since ``expected_etag`` was read.
    """
    if not storage.exists(version_key(version, "model.safetensors")):
        raise FileNotFoundError(f"{storage.url(version_key(version))} has no model.safetensors")
    now = datetime.now(UTC)
    record = {"version": version, "action": action, "at": now.isoformat(), "reason": reason,
              "previous": previous, "metrics": metrics or {}}
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
