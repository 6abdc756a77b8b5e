"""The training stage over storage: fold reuse, checkpoints in storage, the final model choice,
timm configs beside the weights, and the lr range test stage."""

from __future__ import annotations

import numpy as np
import pytest

from darkroom.config import RetrainConfig
from darkroom.data.index import rebuild_index
from darkroom.data.sync import sync_labeled
from darkroom.model.backbone import sha256
from darkroom.training import fold as train
from darkroom.training.candidate import finalize_candidate
from darkroom.training.lr_finder import find_lr
from darkroom.training.steps import NonFiniteLoss
from tests.conftest import TINY, write_digits


class Crash(Exception):
    pass


@pytest.fixture
def indexed(local_storage, cache_dir):
    """Three digit classes synced and indexed into 2 folds; returns (storage, config, snapshot)."""
    write_digits(local_storage, classes=("0", "1", "7"), per_class=14)
    config = RetrainConfig(
        storage=local_storage.uri, cache_dir=str(cache_dir), device="cpu", train=TINY
    )
    sync_labeled(local_storage, config)
    return local_storage, config, rebuild_index(local_storage, config, "test").snapshot


def _config(config, **train):
    return config.model_copy(update={"train": config.train.model_copy(update=train)})


def _train_folds(indexed, config, version="v1"):
    storage, _, snapshot = indexed
    return [
        train.train_fold(storage, config, snapshot, version, k) for k in range(config.train.folds)
    ]


def test_a_finished_fold_is_not_trained_again(indexed, monkeypatch):
    storage, config, _ = indexed
    first = _train_folds(indexed, config)
    assert storage.exists("models/v1/folds/0/fold.json")
    assert not storage.exists("models/v1/folds/0/checkpoint.pt")  # done: resume state dropped
    monkeypatch.setattr(
        train, "fit_run", lambda *a, **kw: pytest.fail("a finished fold was retrained")
    )
    again = _train_folds(indexed, config)
    assert all(s.reused for s in again)
    assert [s.sha256 for s in again] == [s.sha256 for s in first]


def test_an_unfinished_fold_resumes_from_its_storage_checkpoint(indexed):
    storage, config, snapshot = indexed
    config = _config(config, epochs=3)

    def crash(row):
        if row.epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        train.train_fold(storage, config, snapshot, "v1", 0, on_epoch=crash)
    assert not storage.exists("models/v1/folds/0/fold.json")
    assert storage.exists("models/v1/folds/0/checkpoint.pt")
    summary = train.train_fold(storage, config, snapshot, "v1", 0)
    assert summary.resumed_from_epoch == 2 and summary.epochs_run == 3


@pytest.mark.parametrize("every", [0, 300])
def test_a_fold_writes_its_checkpoint_at_most_every_interval_and_at_its_end(
    indexed, monkeypatch, every
):
    storage, config, snapshot = indexed
    config = _config(config, epochs=3).model_copy(update={"checkpoint_every_seconds": every})
    written, real = [], storage.write_bytes

    def record(key, data, **kw):
        written.append(key.rsplit("/", 1)[-1])
        return real(key, data, **kw)

    monkeypatch.setattr(storage, "write_bytes", record)
    summary = train.train_fold(storage, config, snapshot, "v1", 0)
    assert summary.epochs_run == 3
    # 300 s outlast these epochs: one save, at the fold's end; 0: after every epoch
    assert written.count("checkpoint.pt") == (3 if every == 0 else 1)
    assert not storage.exists("models/v1/folds/0/checkpoint.pt")


def test_the_checkpoint_interval_does_not_change_the_model_version(indexed):
    _, config, _ = indexed
    other = config.model_copy(update={"checkpoint_every_seconds": 0})
    assert other.train.fingerprint() == config.train.fingerprint()


def test_non_finite_loss_fails_the_fold_and_writes_no_fold_json(indexed):
    storage, config, snapshot = indexed
    config = _config(config, lr=1e30, lr_min=1e29, epochs=3, batch_size=4)
    with pytest.raises(NonFiniteLoss):
        train.train_fold(storage, config, snapshot, "v1", 0)
    assert not storage.exists("models/v1/folds/0/fold.json")
    assert not storage.exists("models/v1/folds/0/model.safetensors")


@pytest.mark.slow
def test_final_model_best_fold_ensemble_and_refit(indexed):
    storage, config, snapshot = indexed
    config = _config(config, epochs=2)
    cfg = config.train
    summaries = _train_folds(indexed, config)
    files = lambda v: storage.read_bytes(f"models/v1/{v}")  # noqa: E731

    best = finalize_candidate(storage, cfg, snapshot, "v1", summaries)
    assert best.final_model == "best_fold" and not best.members
    assert "ensemble" not in storage.read_json("models/v1/model.json")
    assert best.sha256 == sha256(files(f"folds/{best.chosen_fold}/model.safetensors"))
    for name in ("curves.png", "confusion.png", "per_class.png", "mistakes.png"):
        assert files(name)[:8] == b"\x89PNG\r\n\x1a\n", name
    assert storage.read_json("models/v1/config.json")["label_names"] == ["0", "1", "7"]
    report = storage.read_json("models/v1/oof_metrics.json")
    assert set(report["oof"]["per_class_train_images"]) == {"0", "1", "7"}
    assert "mean" in report["cv"]["accuracy"] and report["cv"] == best.cv

    ens_cfg = cfg.model_copy(update={"final_model": "ensemble"})
    ens = finalize_candidate(storage, ens_cfg, snapshot, "v1", summaries)
    assert ens.members == ["folds/0/model.safetensors", "folds/1/model.safetensors"]
    members = storage.read_json("models/v1/model.json")["ensemble"]
    assert [m["key"] for m in members] == ens.members
    assert all(m["sha256"] == sha256(files(m["key"])) for m in members)
    assert ens.sha256 == best.sha256  # old readers get the best fold
    assert storage.exists("models/v1/folds/1/config.json")  # each member loads with timm
    for k in ("classes", "image_size", "mean", "std", "train_config", "backbone"):
        assert k in storage.read_json("models/v1/model.json"), k

    refit = _config(config, epochs=2, final_model="refit")
    r = train.train_fold(storage, refit, snapshot, "v1", cfg.folds)
    assert r.refit and r.val_images == 0
    assert r.epochs_run == max(1, round(np.mean([s.best_epoch + 1 for s in summaries])))
    final = finalize_candidate(storage, refit.train, snapshot, "v1", summaries)
    assert final.sha256 == r.sha256 == sha256(files("refit/model.safetensors"))
    assert final.refit_epochs == r.epochs_run


def test_find_lr_writes_plot_and_suggestion(indexed):
    storage, config, _ = indexed
    out = find_lr(storage, _config(config, batch_size=8), steps=30)
    assert 0 < len(out["lrs"]) <= 30 and out["lrs"] == sorted(out["lrs"])
    assert out["suggested_lr"] and out["lrs"][0] <= out["suggested_lr"] <= out["lrs"][-1]
    key = out["plot"].split("/bucket/", 1)[1]
    assert storage.read_bytes(key)[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.read_json(key.replace(".png", ".json"))["suggested_lr"] == out["suggested_lr"]
