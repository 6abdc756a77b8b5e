"""A promotion an operator asks for by hand: make a named version the champion, through the
promotion gate on the current holdout, or past it with ``force``. ``darkroom promote`` and the
promote-version flow both call ``promote_version``, so both go through the same gate and the
same conditional pointer write (``darkroom rollback`` and the rollback flow share
``pointer.rollback`` the same way)."""

from __future__ import annotations

from dataclasses import dataclass

from darkroom.config import RetrainConfig
from darkroom.data.index import read_index
from darkroom.model.inference import load_version
from darkroom.registry import pointer, promotion
from darkroom.storage import Storage


class GateRejected(pointer.RegistryError):
    """The gate rejected the version and force was not given: nothing was written.

    Attributes:
        rule: the gate's verdict in words.
    """

    def __init__(self, version: str, rule: str):
        super().__init__(f"{version} not promoted: {rule} (force promotes it anyway)")
        self.rule = rule


@dataclass
class Change:
    """What a promotion by hand did to the champion pointer.

    Attributes:
        champion: the champion now.
        previous: the champion before the call; None when there was none.
        record: the promotion record written; None when nothing moved (the version was the
            champion already).
        rule: the gate's verdict in words; empty when the gate was skipped or not needed.
    """

    champion: str
    previous: str | None
    record: pointer.Champion | None
    rule: str = ""


def promote_version(
    storage: Storage, config: RetrainConfig, version: str, *, force: bool = False, reason: str = ""
) -> Change:
    """Makes ``version`` the champion: through the gate (``config``'s rules, the latest index
    snapshot's holdout) unless ``force``; ``reason`` goes into the promotion record.

    Raises:
        GateRejected: the gate rejected it (and not ``force``).
        PromotionLost: the champion changed while the gate measured it.
        FileNotFoundError, ValueError: the version is missing or its weights were changed.
    """
    champion, etag = pointer.read_champion(storage)
    current = champion.version if champion else None
    if current == version:
        return Change(version, current, None)
    load_version(storage, version, config.device)  # refuses a missing or tampered model
    if force:
        record = pointer.promote(
            storage,
            version,
            expected_etag=etag,
            action="manual-promote",
            reason=_because("manual promotion (force: gate skipped)", reason),
            previous=current,
            metrics=pointer.champion_metrics(storage, version),
        )
        return Change(version, current, record)
    outcome = promotion.judge(storage, config, read_index(storage).snapshot, version)
    rule = outcome.decision.rule
    if not outcome.decision.promote:
        raise GateRejected(version, rule)
    outcome.decision.rule = _because(f"manual promotion through the gate: {rule}", reason)
    promotion.promote_candidate(storage, outcome, action="manual-promote")
    if not outcome.promoted:
        raise pointer.PromotionLost(f"{version} not promoted: {outcome.decision.rule}")
    record, _ = pointer.read_champion(storage)
    return Change(version, outcome.champion_version, record, rule)


def _because(what: str, reason: str) -> str:
    return f"{what}; reason: {reason}" if reason else what
