"""The promotion gate's rules, rollback lineage and racing promotions on a local folder."""

from __future__ import annotations

import threading

import pytest

from darkroom import layout, registry
from darkroom.promotion import decide
from darkroom.registry import PromotionLost, RegistryError, lineage, promote, rollback


def m(acc, **recall):
    return {"accuracy": acc, "f1_macro": acc, "per_class_accuracy": recall}


def test_min_delta_requires_a_margin():
    champion = m(0.90, a=0.9, b=0.9)
    assert not decide(m(0.905, a=0.9, b=0.91), champion, "accuracy", min_delta=0.01).promote
    d = decide(m(0.92, a=0.92, b=0.92), champion, "accuracy", min_delta=0.01)
    assert d.promote and "+0.0200" in d.rule


def test_a_class_recall_drop_beyond_the_limit_rejects_a_better_model():
    champion = m(0.80, cat=0.90, dog=0.70)
    challenger = m(0.85, cat=0.80, dog=0.90)  # better overall, cat recall -0.10
    d = decide(challenger, champion, "accuracy", max_class_recall_drop=0.05)
    assert not d.promote
    assert "'cat'" in d.rule and "0.1000" in d.rule
    assert d.recall_drops == {"cat": pytest.approx(0.10)}
    assert decide(challenger, champion, "accuracy", max_class_recall_drop=0.15).promote


def test_per_class_recall_is_reported_side_by_side():
    d = decide(m(0.9, a=1.0, b=0.8), m(0.8, a=0.7, b=0.9), "accuracy")
    assert d.per_class_recall == {
        "a": {"challenger": 1.0, "champion": 0.7},
        "b": {"challenger": 0.8, "champion": 0.9},
    }


def _version(storage, v):
    storage.write_bytes(layout.version(v, "model.safetensors"), v.encode())


def test_rollback_walks_back_the_lineage(local_storage):
    for v in ("a", "b", "c"):
        _version(local_storage, v)
    with pytest.raises(RegistryError, match="no champion"):
        rollback(local_storage)
    promote(local_storage, "a", expected_etag=None, action="promote", reason="first")
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(local_storage)
    for v in ("b", "c"):
        _, etag = registry.read_champion(local_storage)
        promote(
            local_storage, v, expected_etag=etag, action="promote", reason="better", previous="x"
        )
    assert rollback(local_storage)["version"] == "b"
    assert rollback(local_storage)["version"] == "a"
    assert registry.read_champion(local_storage)[0]["version"] == "a"
    records = registry.history(local_storage)
    assert [(r["action"], r["version"]) for r in records] == [
        ("promote", "a"),
        ("promote", "b"),
        ("promote", "c"),
        ("rollback", "b"),
        ("rollback", "a"),
    ]
    assert lineage(records) == ["a"]


def test_two_promotions_racing_only_one_wins(local_storage):
    for v in ("left", "right"):
        _version(local_storage, v)
    promote(local_storage, "left", expected_etag=None, action="promote", reason="seed")
    _, etag = registry.read_champion(local_storage)
    start, results = threading.Barrier(2), {}

    def attempt(v):
        start.wait()
        try:
            promote(local_storage, v, expected_etag=etag, action="promote", reason="race")
            results[v] = "won"
        except PromotionLost:
            results[v] = "lost"

    # both read the same pointer etag, then race to replace it
    _version(local_storage, "third")
    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("right", "third")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["lost", "won"]
    winner = next(v for v, r in results.items() if r == "won")
    assert registry.read_champion(local_storage)[0]["version"] == winner
    assert [r["version"] for r in registry.history(local_storage)] == ["left", winner]
