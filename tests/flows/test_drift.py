"""Watching the champion on the demo: the digits it was made for pass, the same digits rotated
by 90 degrees are flagged (unfamiliar images, a lower expected accuracy, the drift event on the
Prefect server), and the labeling queue puts its mistakes in front of people.

One demo champion for the module: the demo's data and recipe (``darkroom demo``'s), trained by
the nightly retrain under Prefect's test harness (a real temporary server)."""

from __future__ import annotations

import time

import cv2
import httpx
import numpy as np
import pytest
from prefect.settings import PREFECT_API_URL

from darkroom.cli.demo import DEMO_TRAIN, write_demo_data
from darkroom.config import LabelQueueConfig, ReferenceConfig, RetrainConfig, ScoreConfig
from darkroom.monitoring.labeling import build_queue
from darkroom.scoring.chunks import read_predictions
from darkroom.storage import LocalStorage
from darkroom.training.label_report import read_label_issues
from flows.retrain import nightly_retrain
from flows.score import score_new_images
from tasks.monitoring import DRIFT_DETECTED, LABELS_ADDED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(storage, score config, truth by key, the champion) after the demo's retrain."""
    root = tmp_path_factory.mktemp("drift")
    storage = LocalStorage(root / "bucket")
    write_demo_data(storage)
    runtime = {"storage": storage.uri, "cache_dir": str(root / "cache")}
    result = nightly_retrain(RetrainConfig(**runtime, train=DEMO_TRAIN))
    assert result["promoted"], result
    truth = storage.read_csv("demo/incoming_truth.csv")
    return (
        storage,
        ScoreConfig(**runtime),
        dict(zip(truth["key"], truth["label"].astype(str), strict=True)),
    )


def _accuracy(storage, version: str, truth: dict[str, str]) -> float:
    rows = read_predictions(storage, version)
    rows = rows[rows["key"].isin(truth)]
    return float((rows["label"] == rows["key"].map(truth)).mean())


def _rotate(storage, truth: dict[str, str]) -> dict[str, str]:
    """The incoming digits turned by 90 degrees, under incoming/rotated/; their true labels."""
    turned = {}
    for key, label in truth.items():
        pixels = cv2.imdecode(np.frombuffer(storage.read_bytes(key), np.uint8), 0)
        ok, png = cv2.imencode(".png", cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE))
        rotated = key.replace("incoming/", "incoming/rotated/")
        storage.put_source_object(rotated, png.tobytes())
        turned[rotated] = label
    return turned


def _drift_events(at_least: int = 0, timeout: float = 60) -> list[dict]:
    """The drift events the server stored, once ``at_least`` are there (it stores an event a
    moment after the flow emitted it)."""
    body = {"filter": {"event": {"name": [DRIFT_DETECTED]}}, "limit": 10}
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=30)
        r.raise_for_status()
        found = r.json()["events"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_the_demo_champion_flags_few_of_its_clean_training_labels(demo):
    storage, _, _ = demo
    version = storage.read_json("models/champion.json")["version"]
    flagged = read_label_issues(storage, version)
    trained_on = len(storage.read_parquet(f"models/{version}/oof.parquet"))
    assert trained_on > 1000 and len(flagged) < 0.02 * trained_on, flagged.to_dict("records")


def test_the_demo_digits_pass_and_rotated_ones_are_flagged(demo):
    storage, config, truth = demo
    clean = score_new_images(config)
    version, report = clean["version"], clean["drift"]
    true_clean = _accuracy(storage, version, truth)
    assert report["verdict"] == "ok", report
    assert report["unfamiliar_share"] <= 0.02
    assert abs(report["expected_accuracy"] - true_clean) <= 0.03, (report, true_clean)
    rows = read_predictions(storage, version)
    assert rows["unfamiliar"].notna().all() and rows["unfamiliar"].mean() <= 0.02
    assert {len(e) for e in rows["embedding"]} == {ReferenceConfig().dims + 1}  # PCA + the residual
    assert not _drift_events()

    rotated = _rotate(storage, truth)
    turned = score_new_images(config)
    report = turned["drift"]
    assert turned["scored"] == len(rotated)
    assert report["verdict"] == "drift", report
    assert report["unfamiliar_share"] >= 0.25
    assert report["range_low"] <= clean["drift"]["expected_accuracy"] - 0.2
    assert report["headline"] == report["range_low"]
    written = storage.read_json(f"reports/drift/{version}/{report['url'].rsplit('/', 1)[1]}")
    assert written["unfamiliar_share"] == report["unfamiliar_share"]
    assert storage.exists(f"reports/drift/{version}/{report['url'].rsplit('/', 1)[1][:-5]}.png")
    (event,) = _drift_events(at_least=1)
    assert event["payload"]["unfamiliar_share"] == report["unfamiliar_share"]
    assert event["resource"][LABELS_ADDED] == "false"  # no labeled image since the champion
    assert _accuracy(storage, version, rotated) < 0.5  # what the figures warn about

    # The queue finds the mistakes: wrong predictions are over-represented among its picks.
    queue = build_queue(storage, LabelQueueConfig(storage=storage.uri, n=100))
    picked = storage.read_json(queue.files["json"])
    chosen = [t["data"]["key"] for t in picked if t["data"]["why"] != "random"]
    every = read_predictions(storage, version).set_index("key")["label"]
    wrong = {k for k in every.index if every[k] != {**truth, **rotated}[k]}
    share_all = len(wrong) / len(every)
    share_queued = len(wrong & set(chosen)) / len(chosen)
    assert share_queued >= 1.5 * share_all, (share_queued, share_all)
