"""An operator's decisions in the core: a rollback to a version the history names (with a
reason), what it refuses, and a person's answer deciding whether a candidate the gate accepted
moves the pointer."""

from __future__ import annotations

import pytest

from darkroom import layout
from darkroom.registry import pointer, promotion
from darkroom.registry.gate import Decision
from darkroom.registry.pointer import RegistryError, promote, read_champion, rollback


def _version(storage, v: str) -> None:
    storage.write_bytes(layout.version(v, "model.safetensors"), v.encode())


def _champions(storage, *versions: str) -> None:
    """Each of ``versions`` promoted in turn."""
    for v in versions:
        _version(storage, v)
        current, etag = read_champion(storage)
        previous = current.version if current else None
        promote(storage, v, expected_etag=etag, action="promote", reason="t", previous=previous)


def test_rollback_to_a_named_version_of_the_history_with_a_reason(local_storage):
    _champions(local_storage, "a", "b", "c")
    record = rollback(local_storage, "a", "c misread the night images")
    assert (record.version, record.previous, record.action) == ("a", "c", "rollback")
    assert record.reason == "rollback from c: c misread the night images"
    assert read_champion(local_storage)[0] == record == pointer.history(local_storage)[-1]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(local_storage)  # the lineage walked back to a: none before it


@pytest.mark.parametrize(
    ("target", "why"),
    [("never", "was never the champion"), ("b", "already the champion")],
)
def test_a_rollback_to_a_version_not_in_the_history_or_the_champion_writes_nothing(
    local_storage, target, why
):
    _champions(local_storage, "a", "b")
    _version(local_storage, "never")  # trained, never promoted
    before = pointer.history(local_storage)
    with pytest.raises(RegistryError, match=why):
        rollback(local_storage, target)
    assert pointer.history(local_storage) == before
    assert read_champion(local_storage)[0].version == "b"


def _outcome(version: str, answer: str | None) -> promotion.Outcome:
    decision = Decision(True, "promoted: first model", "accuracy", 1.0, None, 0.5, 0, 0.05, 0,
                        0.05, 0.05)  # fmt: skip
    approval = promotion.Approval(answer, "a note", "2026-01-01T00:00:00+00:00") if answer else None
    return promotion.Outcome(version, False, decision, {"accuracy": 1.0}, approval=approval)


@pytest.mark.parametrize(
    ("answer", "moves"),
    [
        (None, True),  # no approval asked for: the gate decides
        (promotion.APPROVED, True),
        (promotion.REJECTED, False),
        (promotion.TIMED_OUT, False),
        (promotion.PENDING, False),
    ],
)
def test_a_candidate_the_gate_accepts_moves_the_pointer_only_if_approved(
    local_storage, answer, moves
):
    _version(local_storage, "v1")
    outcome = promotion.promote_candidate(local_storage, _outcome("v1", answer))
    champion, _ = read_champion(local_storage)
    assert outcome.promoted is moves and (champion is not None) is moves
    if moves:
        expected = None if answer is None else {"answer": answer, "note": "a note"}
        got = champion.approval and {k: champion.approval[k] for k in ("answer", "note")}
        assert got == expected


def test_decision_json_keeps_the_answer(local_storage):
    outcome = _outcome("v1", promotion.REJECTED)
    promotion.write_decision(local_storage, outcome)
    kept = local_storage.read_json(layout.version("v1", "decision.json"))
    assert kept["promote"] is True  # the gate's verdict stays the gate's
    assert kept["approval"]["answer"] == "rejected" and kept["approval"]["note"] == "a note"
