"""nightly_retrain then score_new_images under Prefect's test harness, on real digit images."""

from __future__ import annotations

import io
import json
import math

import httpx
import pandas as pd
import pytest
from prefect.settings import PREFECT_API_URL

from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.scoring.chunks import read_predictions
from flows.retrain import nightly_retrain
from flows.score import NoChampion, score_new_images
from tests.conftest import LEARNS, PREDICTION_COLUMNS, write_digits

pytestmark = pytest.mark.slow


def _retrain(storage, cache_dir, **train):
    return nightly_retrain(
        RetrainConfig(
            storage=storage.uri, cache_dir=str(cache_dir), train=LEARNS.model_copy(update=train)
        )
    )


def test_retrain_then_score_writes_the_contract_files(local_storage, cache_dir):
    truth = write_digits(local_storage, classes=("0", "1", "2"), per_class=24, incoming=7)
    incoming = {k for k in truth if k.startswith("incoming/")}

    with pytest.raises(NoChampion, match="run a retrain first"):
        score_new_images(ScoreConfig(storage=local_storage.uri, cache_dir=str(cache_dir)))

    result = _retrain(local_storage, cache_dir)
    assert result["promoted"] and not result["skipped"]
    assert result["sync"]["new"] == result["sync"]["listed"] == 72
    version = result["version"]
    champion = json.loads(local_storage.read_text("models/champion.json"))
    assert champion["version"] == version
    for name in (
        "model.safetensors",
        "model.json",
        "metrics.json",
        "decision.json",
        "oof.parquet",
        "curves.png",
        "confusion.png",
        "folds/0/model.safetensors",
        "folds/1/fold.json",
    ):
        assert local_storage.exists(f"models/{version}/{name}"), name
    assert local_storage.read_bytes(f"models/{version}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads(local_storage.read_text(f"models/{version}/model.json"))
    assert meta["classes"] == ["0", "1", "2"] and meta["backbone"] == "test_resnet"
    metrics = json.loads(local_storage.read_text(f"models/{version}/metrics.json"))
    assert len(metrics["folds"]) == 2 and "mean" in metrics["cv"]["accuracy"]
    oof = pd.read_parquet(io.BytesIO(local_storage.read_bytes(f"models/{version}/oof.parquet")))
    assert len(oof) == result["index"]["summary"]["train"]  # every train row predicted once
    assert len(list(local_storage.list("models/promotions/"))) == 1

    # DataLoader workers inside Prefect's task threads: the multithreaded process that
    # must not be forked.
    scored = score_new_images(
        ScoreConfig(
            storage=local_storage.uri, cache_dir=str(cache_dir), chunk_size=3, num_workers=1
        )
    )
    assert scored["version"] == version and scored["scored"] == 7 and scored["chunks"] == 3
    preds = read_predictions(local_storage, version)
    assert set(preds["key"]) == incoming and len(preds) == 7
    assert list(preds.columns) == PREDICTION_COLUMNS
    assert (preds["status"] == "ok").all() and preds["topk_labels"].map(len).eq(3).all()

    again = score_new_images(ScoreConfig(storage=local_storage.uri, cache_dir=str(cache_dir)))
    assert again["scored"] == 0 and again["already_scored"] == 7
    assert len(list(local_storage.list(f"predictions/{version}/"))) == 3

    rerun = _retrain(local_storage, cache_dir)
    assert rerun["skipped"] and rerun["sync"]["unchanged"] == 72

    # Plain HTTP: this Prefect client sends null filter fields that its server rejects (422).
    api = PREFECT_API_URL.value()
    found = httpx.post(f"{api}/artifacts/filter", json={"limit": 200}).raise_for_status().json()
    keys = {a["key"] for a in found}
    assert {"fold-metrics", "promotion-decision", "scoring-summary", "data-changes"} <= keys
    # What changed since the champion's snapshot: the rerun saw the same data (the first run,
    # with no champion yet, counted all 72 as new).
    snapshot = result["index"]["snapshot"]
    changes = local_storage.read_json(f"index/{snapshot}.changes.json")
    assert changes["since"] == snapshot and rerun["changes"]["new"] == 0
    assert result["changes"]["new"] == result["sync"]["listed"] == 72
    assert sum(c["images"] for c in changes["classes"]) == result["index"]["summary"]["usable"]


def _mcnemar_p(b: int, c: int) -> float:
    """The two-sided exact binomial test on the discordant pairs, written out again here."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return 1.0 if n == 0 else min(1.0, 2 * tail / 2**n)


def test_a_changed_config_trains_a_challenger_that_must_beat_the_champion(local_storage, cache_dir):
    write_digits(local_storage, classes=("3", "4"), per_class=20)
    # Enough optimizer steps to learn the digits: the gate no longer crowns a coin toss.
    learns = {"batch_size": 4, "epochs": 5}
    first = _retrain(local_storage, cache_dir, **learns)
    assert first["promoted"], first["decision"]["rule"]
    # No champion yet: the first model had to clear the majority-class baseline by the margin.
    assert first["decision"]["test"] is None
    assert first["decision"]["challenger"] >= (
        first["decision"]["baseline"] + first["decision"]["baseline_margin"] - 1e-9
    )
    second = _retrain(local_storage, cache_dir, **learns, seed=7)
    assert not second["skipped"] and second["version"] != first["version"]
    decision = json.loads(local_storage.read_text(f"models/{second['version']}/decision.json"))
    champion = json.loads(local_storage.read_text("models/champion.json"))
    # The same holdout for both, and the gate's rules recomputed from the saved decision.
    new, old = decision["challenger_holdout"], decision["champion_holdout"]
    n, b, c = new["n"], decision["b"], decision["c"]
    assert n == old["n"] and decision["test"] == "exact McNemar"
    # Paired counts agree with both models' accuracies: b - c is the gain in right images.
    assert b - c == round(n * new["accuracy"]) - round(n * old["accuracy"]) and b + c <= n
    p = _mcnemar_p(b, c)
    assert decision["p_value"] == pytest.approx(p, rel=1e-9)
    drops = [v["champion"] - v["challenger"] for v in decision["per_class_recall"].values()]
    gain = decision["challenger"] - decision["champion"]
    should = (
        gain > 0
        and gain >= decision["min_delta"] - 1e-9
        and (decision["max_p_value"] >= 1 or (b > c and p < decision["max_p_value"]))
        and max(drops) <= decision["max_class_recall_drop"] + 1e-9
    )
    assert second["promoted"] == should == decision["promote"]
    if should:
        assert champion["version"] == second["version"]
    else:
        assert not second["promoted"] and champion["version"] == first["version"]
        assert len(list(local_storage.list("models/promotions/"))) == 1


def test_a_dataset_with_one_class_fails_fast_with_the_fix(local_storage, cache_dir):
    write_digits(local_storage, classes=("5",), per_class=10)
    with pytest.raises(Exception, match="at least 2 classes"):
        _retrain(local_storage, cache_dir)
    assert not local_storage.exists("models/champion.json")
