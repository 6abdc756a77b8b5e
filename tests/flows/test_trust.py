"""Numbers you can trust, end to end through nightly_retrain and score_new_images on real digit
images: a temperature kept with the version and checked on the holdout, scored confidences that
are the softmax of the version's logits over that temperature (computed here through timm's own
local-dir loader), a label-issue report, and a model card Hugging Face reads."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import ModelCard

from darkroom import layout
from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.data.cache import resize_square
from darkroom.data.images import decode_rgb
from darkroom.registry.evaluation import read_metrics
from darkroom.scoring.chunks import read_predictions
from darkroom.training.label_report import read_label_issues
from flows.retrain import nightly_retrain
from flows.score import score_new_images
from tests.conftest import LEARNS, write_digits

pytestmark = pytest.mark.slow
TEMPERATURE = 2.5  # set by the test: scoring must use whatever the version holds


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from darkroom.storage import LocalStorage

    root = tmp_path_factory.mktemp("trust")
    storage, cache = LocalStorage(root / "bucket"), root / "cache"
    truth = write_digits(storage, classes=("0", "1", "2"), per_class=30, incoming=24)
    config = RetrainConfig(storage=storage.uri, cache_dir=str(cache), train=LEARNS)
    result = nightly_retrain(config)
    assert result["promoted"], result["decision"]["rule"]
    return storage, cache, result["version"], truth


def test_the_temperature_is_kept_with_the_version_and_checked_on_the_holdout(trained):
    storage, _, version, _ = trained
    meta = storage.read_json(layout.version(version, "model.json"))
    c = meta["calibration"]
    assert c["temperature"] > 0 and "fold" in c["fitted_on"]  # best_fold: its own validation
    before, after = c["holdout_before"], c["holdout_after"]
    if c["kept_identity"]:  # the holdout refused it, or too few mistakes to fit one
        assert c["temperature"] == 1.0
        assert "holdout" in c["reason"] or "mistakes" in c["reason"], c["reason"]
    else:
        assert after["nll"] <= before["nll"] and c["temperature"] == c["fitted_temperature"]
    assert after["accuracy"] == before["accuracy"]  # a temperature moves no argmax
    decision = storage.read_json(layout.version(version, "decision.json"))
    assert decision["calibration"]["temperature"] == c["temperature"]
    assert "ece" in decision["challenger_holdout"]
    assert storage.read_bytes(layout.version(version, "reliability.png"))[:4] == b"\x89PNG"


def test_the_label_issue_report_and_the_model_card(trained, tmp_path):
    storage, _, version, _ = trained
    report = read_label_issues(storage, version)
    assert set(report.columns) >= {"key", "given_label", "suggested_label", "self_confidence"}
    assert (report["given_label"] != report["suggested_label"]).all()
    path = tmp_path / "README.md"
    path.write_text(storage.read_text(layout.version(version, "README.md")))
    card = ModelCard.load(path)
    holdout = read_metrics(storage, version).holdout
    found = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert found and all(found[k] == holdout[k] for k in found)
    assert card.data.library_name == "timm" and card.data.model_name == version


def test_scored_confidences_are_timms_logits_over_the_versions_temperature(trained):
    storage, cache, version, truth = trained
    key = layout.version(version, "model.json")
    meta = storage.read_json(key)
    meta["calibration"] = {**meta["calibration"], "temperature": TEMPERATURE}
    storage.write_json(key, meta)
    scored = score_new_images(ScoreConfig(storage=storage.uri, cache_dir=str(cache)))
    assert scored["scored"] == 24
    preds = read_predictions(storage, version).sort_values("key")
    folder = storage.local_path(layout.version(version, "model.json")).parent
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size, mean, std = meta["image_size"], np.array(meta["mean"]), np.array(meta["std"])
    pixels = [resize_square(decode_rgb(storage.read_bytes(k)), size) for k in preds["key"]]
    x = (np.stack(pixels).astype(np.float32) / 255.0 - mean) / std
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2)).float())
    probs = torch.softmax(logits / TEMPERATURE, 1).numpy()
    assert len(set(probs.argmax(1))) >= 3  # predictions that vary: agreement is not trivial
    labels = [meta["classes"][i] for i in probs.argmax(1)]
    assert list(preds["label"]) == labels
    np.testing.assert_allclose(preds["confidence"], probs.max(1), atol=2e-4)
    raw = torch.softmax(logits, 1).numpy().max(1)
    assert np.abs(raw - probs.max(1)).max() > 0.01  # the temperature visibly changed them
