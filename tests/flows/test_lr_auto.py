"""``lr: auto`` through the nightly retrain: the range test picks the lr before the folds, every
fold trains at it, the choice is kept with the version, and an unchanged night trains nothing."""

from __future__ import annotations

import pytest

from darkroom.config import RetrainConfig
from darkroom.training import fold as fold_module
from flows.retrain import nightly_retrain
from tests.conftest import LEARNS, write_digits

pytestmark = pytest.mark.slow


def test_lr_auto_trains_every_fold_at_the_range_tests_choice(local_storage, cache_dir, monkeypatch):
    write_digits(local_storage, classes=("0", "1", "2"), per_class=20)
    config = RetrainConfig(
        storage=local_storage.uri,
        cache_dir=str(cache_dir),
        train=LEARNS.model_copy(update={"lr": "auto"}),
    )
    first = nightly_retrain(config)
    version = first["version"]
    meta = local_storage.read_json(f"models/{version}/model.json")
    choice = meta["lr_choice"]
    assert meta["train_config"]["lr"] == "auto"  # the version is made from the config as given
    assert choice["tested_from"] < choice["lr"] < choice["tested_to"]
    assert choice["lr"] in choice["curve"]["lrs"] and "fell fastest" in choice["reason"]
    assert local_storage.read_json(f"models/{version}/lr_finder.json") == choice
    assert local_storage.read_bytes(f"models/{version}/lr_finder.png")[:4] == b"\x89PNG"
    for k in range(LEARNS.folds):
        history = local_storage.read_json(f"models/{version}/folds/{k}/fold.json")["history"]
        # the cosine starts at the chosen lr: epoch 1's lr (after its steps) is below it, and the
        # last reaches lr_min capped at the choice
        assert all(row["lr"] <= choice["lr"] for row in history)
        assert history[-1]["lr"] == pytest.approx(min(LEARNS.lr_min, choice["lr"]), rel=1e-3)
    card = local_storage.read_text(f"models/{version}/README.md")
    assert f"Learning rate: {choice['lr']:.3g}" in card

    def no_training(*a, **kw):
        raise AssertionError("an unchanged night trained a fold")

    monkeypatch.setattr(fold_module, "fit_run", no_training)
    again = nightly_retrain(config)
    assert again["skipped"] and again["version"] == version
