"""Promotion decisions, the champion pointer and the append-only promotion log."""

from __future__ import annotations

import json

import numpy as np
import pytest

from darkroom.config import RetrainConfig
from darkroom.layout import CHAMPION, PROMOTIONS
from darkroom.model.metrics import classification_metrics
from darkroom.registry import pointer as registry
from darkroom.registry.gate import Holdout, decide
from darkroom.registry.pointer import PromotionLost, history, promote


def _fake_version(storage, version: str) -> None:
    storage.write_bytes(f"models/{version}/model.safetensors", b"weights of " + version.encode())


def _records(storage) -> list[str]:
    return [o.key for o in storage.list(PROMOTIONS)]


# ---- decide ---------------------------------------------------------------------------------
# Holdout results built from real labels and predictions; the gate's rules in detail are in
# test_gate.py.

LABELS = np.arange(200) % 2  # 100 "a", 100 "b", interleaved


def _holdout(labels, wrong) -> Holdout:
    """Right on every row but ``wrong``, where it predicts the other class."""
    y = np.asarray(labels)
    right = ~np.isin(np.arange(len(y)), list(wrong))
    pred = np.where(right, y, 1 - y)
    return Holdout(classification_metrics(y, np.eye(2)[pred], ["a", "b"]), right.tolist())


def _gate(metric: str) -> RetrainConfig:
    return RetrainConfig(train={"metric": metric})


def test_no_champion_promotes_a_first_model_that_beats_the_baseline():
    d = decide(_holdout(LABELS, range(20)), None, _gate("accuracy"))
    assert d.promote is True
    assert d.champion is None and d.challenger == 0.9 and d.baseline == 0.5
    assert d.metric == "accuracy" and "no champion yet" in d.rule


def test_no_champion_no_longer_promotes_whatever_its_accuracy():
    d = decide(_holdout(LABELS, range(100)), None, _gate("accuracy"))  # a coin: 0.5
    assert d.promote is False and "majority-class baseline" in d.rule


def test_better_promotes():
    champion, challenger = _holdout(LABELS, range(40)), _holdout(LABELS, range(30, 40))
    d = decide(challenger, champion, _gate("f1_macro"))
    assert d.promote is True
    assert (d.challenger, d.champion) == pytest.approx((0.95, 0.8), abs=1e-3)
    assert "f1_macro" in d.rule and d.rule.startswith("promoted")


@pytest.mark.parametrize("wrong", [range(40), range(100)])  # 0.8 (equal), 0.5 (worse)
def test_equal_or_worse_rejects(wrong):
    d = decide(_holdout(LABELS, wrong), _holdout(LABELS, range(160, 200)), _gate("accuracy"))
    assert d.promote is False
    assert "accuracy" in d.rule
    assert d.rule.startswith("rejected") and "does not beat" in d.rule


def test_decide_uses_the_named_metric_only():
    # 80 "a", 20 "b". Champion misses 20 "a"; challenger calls everything "a" but 5 "b":
    # accuracy 0.80 -> 0.85, macro F1 0.76 -> 0.66. The metric decides.
    labels = np.repeat([0, 1], [80, 20])
    champion, challenger = _holdout(labels, range(60, 80)), _holdout(labels, range(85, 100))
    d = decide(challenger, champion, _gate("f1_macro"))
    assert challenger.metrics["accuracy"] > champion.metrics["accuracy"]
    assert d.promote is False and "does not beat" in d.rule


# ---- promote --------------------------------------------------------------------------------


def test_first_promotion_writes_pointer_then_one_record(local_storage):
    _fake_version(local_storage, "v1")
    record = promote(
        local_storage,
        "v1",
        expected_etag=None,
        action="promote",
        reason="no champion yet",
        metrics={"accuracy": 0.9},
    )
    champion, etag = registry.read_champion(local_storage)
    assert champion == record
    assert etag == local_storage.etag(CHAMPION)
    assert champion.version == "v1" and champion.action == "promote"
    assert champion.metrics == {"accuracy": 0.9}
    keys = _records(local_storage)
    assert len(keys) == 1 and keys[0].endswith("-v1.json")
    assert json.loads(local_storage.read_text(keys[0])) == record.as_dict()


def test_second_promotion_with_current_etag(local_storage):
    _fake_version(local_storage, "v1")
    _fake_version(local_storage, "v2")
    promote(local_storage, "v1", expected_etag=None, action="promote", reason="first")
    _, etag = registry.read_champion(local_storage)
    promote(
        local_storage, "v2", expected_etag=etag, action="promote", reason="better", previous="v1"
    )
    champion, new_etag = registry.read_champion(local_storage)
    assert champion.version == "v2" and champion.previous == "v1"
    assert new_etag != etag
    assert [r.version for r in history(local_storage)] == ["v1", "v2"]


def test_stale_etag_loses_and_writes_no_record(local_storage):
    for v in ("v1", "v2", "v3"):
        _fake_version(local_storage, v)
    promote(local_storage, "v1", expected_etag=None, action="promote", reason="first")
    _, stale = registry.read_champion(local_storage)
    promote(local_storage, "v2", expected_etag=stale, action="promote", reason="won")
    with pytest.raises(PromotionLost, match="v3"):
        promote(local_storage, "v3", expected_etag=stale, action="promote", reason="late")
    assert registry.read_champion(local_storage)[0].version == "v2"
    assert len(_records(local_storage)) == 2
    assert all("v3" not in k for k in _records(local_storage))


def test_expected_none_when_champion_exists_loses(local_storage):
    _fake_version(local_storage, "v1")
    _fake_version(local_storage, "v2")
    promote(local_storage, "v1", expected_etag=None, action="promote", reason="first")
    with pytest.raises(PromotionLost):
        promote(local_storage, "v2", expected_etag=None, action="promote", reason="race")
    assert registry.read_champion(local_storage)[0].version == "v1"
    assert len(_records(local_storage)) == 1


def test_promote_without_weights_refused(local_storage):
    local_storage.write_text("models/v9/model.json", "{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        promote(local_storage, "v9", expected_etag=None, action="promote", reason="x")
    assert not local_storage.exists(CHAMPION)
    assert _records(local_storage) == []


def test_history_in_order_including_rollback(local_storage):
    for v in ("v1", "v2"):
        _fake_version(local_storage, v)
    promote(local_storage, "v1", expected_etag=None, action="promote", reason="a")
    promote(
        local_storage,
        "v2",
        expected_etag=registry.read_champion(local_storage)[1],
        action="promote",
        reason="b",
        previous="v1",
    )
    promote(
        local_storage,
        "v1",
        expected_etag=registry.read_champion(local_storage)[1],
        action="rollback",
        reason="c",
        previous="v2",
    )
    records = history(local_storage)
    assert [(r.version, r.action, r.reason) for r in records] == [
        ("v1", "promote", "a"),
        ("v2", "promote", "b"),
        ("v1", "rollback", "c"),
    ]
    assert [r.at for r in records] == sorted(r.at for r in records)
    assert registry.read_champion(local_storage)[0].action == "rollback"


def test_history_empty(local_storage):
    assert history(local_storage) == []
    assert registry.read_champion(local_storage) == (None, None)


def test_helpers(local_storage):
    assert registry.new_version("0123456789abcdef", "fedcba987654") == "01234567-fedcba98"
    assert local_storage.read_json("models/none.json", missing_ok=True) is None
    with pytest.raises(FileNotFoundError):
        local_storage.read_json("models/none.json")
    local_storage.write_json("models/x.json", {"a": 1})
    assert local_storage.read_json("models/x.json") == {"a": 1}
