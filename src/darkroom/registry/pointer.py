"""The model registry: versions, the champion pointer, its history and rollback.

The pointer ``models/champion.json`` moves only in one conditional write, after the version
folder is complete; each move appends a record under ``models/promotions/``. Whether a
candidate deserves the pointer is decided in ``promotion``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from darkroom import layout
from darkroom.registry.evaluation import read_metrics
from darkroom.registry.tracking_client import champion_changed
from darkroom.storage import PreconditionFailed, Storage


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked; the message says why."""


class PromotionLost(RegistryError):
    """Another promotion changed the champion pointer first; nothing was written."""


@dataclass(frozen=True)
class Champion:
    """The champion pointer (``models/champion.json``), and each record of its history under
    ``models/promotions/``: one move of the pointer, with the same fields.

    Attributes:
        action: "promote", "manual-promote" or "rollback".
        at: when the pointer moved (ISO 8601, UTC).
        previous: the version it pointed at before; None for the first champion.
        metrics: the version's holdout metrics shown with it.
        approval: a person's answer, where the retrain asked for one (require_approval):
            answer, note, when.
    """

    version: str
    action: str = "promote"
    at: str = ""
    reason: str = ""
    previous: str | None = None
    metrics: dict = field(default_factory=dict)
    approval: dict | None = None

    @classmethod
    def from_dict(cls, record: dict) -> Champion:
        """The record as stored (fields it lacks take their defaults)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in record.items() if k in names})

    def as_dict(self) -> dict:
        """The record as stored: the JSON object of ``models/champion.json``."""
        return asdict(self)


def new_version(snapshot: str, config_fingerprint: str) -> str:
    """Deterministic for a snapshot and config, so a rerun finds the folds it already trained."""
    return f"{snapshot[:8]}-{config_fingerprint[:8]}"


def read_champion(storage: Storage) -> tuple[Champion | None, str | None]:
    """The champion pointer and its etag (for the conditional write that replaces it)."""
    etag = storage.etag(layout.CHAMPION)
    if etag is None:
        return None, None
    return Champion.from_dict(storage.read_json(layout.CHAMPION)), etag


def verify(storage: Storage, version: str) -> None:
    """Checks every weights file of ``version`` against the sha256 in its model.json.

    Raises:
        FileNotFoundError: the version or a weights file is missing.
        ValueError: a weights file does not match its recorded hash.
    """
    if not storage.exists(layout.version(version, "model.safetensors")):
        raise FileNotFoundError(f"{storage.url(layout.version(version))} has no model.safetensors")
    meta = storage.read_json(layout.version(version, "model.json"), missing_ok=True)
    if meta is None:
        return  # a bare weights file (older layout): nothing recorded to check against
    files = [("model.safetensors", meta.get("sha256"))]
    files += [(m["key"], m["sha256"]) for m in meta.get("ensemble") or []]
    for name, expected in files:
        data = storage.read_bytes(layout.version(version, name))
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(
                f"{storage.url(layout.version(version, name))} does not match the "
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
    approval: dict | None = None,
) -> Champion:
    """Points the champion at ``version`` in one conditional write, then logs the record.

    Raises:
        PromotionLost: the pointer changed since ``expected_etag`` was read.
    """
    verify(storage, version)
    now = datetime.now(UTC)
    champion = Champion(version, action, now.isoformat(), reason, previous, metrics or {}, approval)
    record = champion.as_dict()
    try:
        if expected_etag is None:
            storage.write_json(layout.CHAMPION, record, if_none_match=True)
        else:
            storage.write_json(layout.CHAMPION, record, if_match=expected_etag)
    except PreconditionFailed as e:
        raise PromotionLost(f"champion pointer changed meanwhile; {version} not promoted") from e
    storage.write_json(layout.promotion_record(now, version), record, if_none_match=True)
    champion_changed(version)  # MLflow's champion alias follows (when tracking is on)
    return champion


def history(storage: Storage) -> list[Champion]:
    return [Champion.from_dict(storage.read_json(o.key)) for o in storage.list(layout.PROMOTIONS)]


def lineage(records: list[Champion]) -> list[str]:
    """The chain of champions that rollbacks walk back: promotions push, rollbacks pop."""
    stack: list[str] = []
    for r in records:
        if r.action == "rollback":
            while stack and stack[-1] != r.version:
                stack.pop()
            if not stack:
                stack.append(r.version)
        else:
            stack.append(r.version)
    return stack


def rollback(storage: Storage, to_version: str | None = None, reason: str = "") -> Champion:
    """Points the champion back at the one it replaced, or at ``to_version``, a version the
    history names (one conditional write + a record, ``reason`` in it).

    Raises:
        RegistryError: there is no champion, none before it, or ``to_version`` is the champion
            or was never one.
        PromotionLost: the pointer changed meanwhile.
    """
    champion, etag = read_champion(storage)
    if champion is None:
        raise RegistryError("no champion yet: nothing to roll back")
    records = history(storage)
    target = to_version or _previous_champion(storage, champion, records)
    if target == champion.version:
        raise RegistryError(f"{target} is already the champion: nothing to roll back")
    if target not in {r.version for r in records}:
        raise RegistryError(
            f"{target} was never the champion (not in {storage.url(layout.PROMOTIONS)}): roll "
            "back to a version `darkroom history` lists, or promote it"
        )
    return promote(
        storage,
        target,
        expected_etag=etag,
        action="rollback",
        reason=f"rollback from {champion.version}" + (f": {reason}" if reason else ""),
        previous=champion.version,
        metrics=champion_metrics(storage, target),
    )


def _previous_champion(storage: Storage, champion: Champion, records: list[Champion]) -> str:
    chain = lineage(records)
    if len(chain) < 2 or chain[-1] != champion.version:
        raise RegistryError(
            f"no previous champion before {champion.version} in "
            f"{storage.url(layout.PROMOTIONS)}: nothing to roll back to"
        )
    return chain[-2]


def champion_metrics(storage: Storage, version: str) -> dict:
    metrics = read_metrics(storage, version)
    return metrics.headline() if metrics else {}


def list_versions(storage: Storage) -> list[str]:
    found = (layout.version_of(o.key) for o in storage.list(layout.MODELS))
    return sorted({v for v in found if v})
