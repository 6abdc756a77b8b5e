"""Scoring with an ensemble champion and ``tta``: each written probability is the average,
over the fold models (loaded here with timm's own local-dir loader) and over the image and its
horizontal flip, of the softmax of the logits, then the version's temperature."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from darkroom import layout
from darkroom.config import ScoreConfig
from darkroom.data.cache import resize_square
from darkroom.data.images import decode_rgb
from darkroom.registry import pointer
from darkroom.scoring.chunks import read_predictions
from flows.score import score_new_images
from tests.conftest import TINY, train_candidate, write_digits

pytestmark = pytest.mark.slow
TEMPERATURE = 0.4  # set by the test (below 1: sharper, so every difference shows more)


def by_hand(storage, version: str, keys, meta: dict, members: int, flip: bool) -> np.ndarray:
    """softmax(log(mean of softmax(logits) over members and views) / T), as darkroom documents."""
    size, mean, std = meta["image_size"], np.array(meta["mean"]), np.array(meta["std"])
    pixels = [resize_square(decode_rgb(storage.read_bytes(k)), size) for k in keys]
    x = torch.from_numpy(((np.stack(pixels) / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
    views = [x, x.flip(-1)] if flip else [x]
    probs = []
    for k in range(members):
        folder = storage.local_path(layout.fold(version, k, "config.json")).parent
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            probs += [torch.softmax(model(v), 1) for v in views]
    averaged = torch.stack(probs).mean(0)
    return torch.softmax(torch.log(averaged) / TEMPERATURE, 1).numpy()


def test_an_ensemble_champion_scored_with_tta_averages_folds_and_flips(local_storage, cache_dir):
    write_digits(local_storage, classes=("0", "1", "2"), per_class=12, incoming=10)
    version = train_candidate(
        local_storage, cache_dir, TINY.model_copy(update={"final_model": "ensemble"})
    )
    meta_key = layout.version(version, "model.json")
    meta = local_storage.read_json(meta_key)
    assert [m["key"] for m in meta["ensemble"]] == ["folds/0/model.safetensors",
                                                    "folds/1/model.safetensors"]  # fmt: skip
    meta["calibration"] = {**(meta.get("calibration") or {}), "temperature": TEMPERATURE}
    local_storage.write_json(meta_key, meta)
    pointer.promote(local_storage, version, expected_etag=None, action="promote", reason="t")

    config = ScoreConfig(storage=local_storage.uri, cache_dir=str(cache_dir), tta=True, topk=3)
    assert score_new_images(config)["scored"] == 10
    preds = read_predictions(local_storage, version).sort_values("key")
    expected = by_hand(local_storage, version, preds["key"], meta, members=2, flip=True)
    written = np.stack(
        [[dict(zip(ls, ps, strict=True))[c] for c in meta["classes"]]
         for ls, ps in zip(preds["topk_labels"], preds["topk_probs"], strict=True)]
    )  # fmt: skip
    np.testing.assert_allclose(written, expected, atol=2e-5)
    np.testing.assert_allclose(preds["confidence"], expected.max(1), atol=2e-5)
    # Neither one fold model nor the image alone gives these numbers.
    for members, flip in ((1, True), (2, False)):
        other = by_hand(local_storage, version, preds["key"], meta, members, flip)
        assert np.abs(other - written).max() > 1e-3, (members, flip)
