"""Model behaviour: one epoch learns something, the best epoch is kept, weights load safely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from darkroom.config import TrainConfig
from darkroom.model import create_model, load_weights, sha256, to_bytes
from darkroom.sync import sync_prefix
from darkroom.training import NonFiniteLoss, fit
from tests.conftest import TINY, write_digits


@pytest.fixture
def digit_files(local_storage, cache_dir):
    truth = write_digits(local_storage, classes=("0", "1", "7"), per_class=16)
    _, manifest = sync_prefix(local_storage, "labeled/", cache_dir)
    classes = sorted(set(truth.values()))
    keys = sorted(manifest)
    paths = [manifest[k].path for k in keys]
    labels = [classes.index(truth[k]) for k in keys]
    return paths, labels, classes


def test_fit_returns_best_epoch_weights_and_validation_probs(digit_files):
    paths, labels, classes = digit_files
    cfg = TINY.model_copy(update={"epochs": 3})
    seen = []
    res = fit(paths[::2], labels[::2], paths[1::2], labels[1::2], len(classes), cfg,
              device=torch.device("cpu"), on_epoch=seen.append)
    assert [h["epoch"] for h in res.history] == [0, 1, 2] == [h["epoch"] for h in seen]
    best = min(range(3), key=lambda e: res.history[e]["val_loss"])
    assert res.best_epoch == best
    assert res.val_probs.shape == (len(paths[1::2]), len(classes))
    np.testing.assert_allclose(res.val_probs.sum(1), 1.0, rtol=1e-4)
    # the weights returned are the best epoch's: re-evaluating reproduces its validation loss
    from darkroom.data import build_transform
    from darkroom.training import evaluate, make_loader

    loader = make_loader(paths[1::2], labels[1::2], build_transform(32, res.mean, res.std),
                         32, shuffle=False)
    stats, _ = evaluate(res.model, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    assert stats["loss"] == pytest.approx(res.history[best]["val_loss"], rel=1e-4)


def test_training_reduces_loss_on_real_digits(digit_files):
    paths, labels, classes = digit_files
    cfg = TINY.model_copy(update={"epochs": 4, "lr": 1e-2, "batch_size": 8})
    res = fit(paths, labels, paths, labels, len(classes), cfg, device=torch.device("cpu"))
    first, last = res.history[0], res.history[-1]
    assert last["train_loss"] < first["train_loss"] / 2
    assert last["train_accuracy"] > 0.9
    # eval mode (BatchNorm running statistics) also beats chance clearly
    assert max(h["val_accuracy"] for h in res.history) > 1 / len(classes) + 0.2


def test_seeded_training_is_reproducible(digit_files):
    paths, labels, classes = digit_files
    a = fit(paths, labels, paths[:6], labels[:6], len(classes), TINY, device=torch.device("cpu"))
    b = fit(paths, labels, paths[:6], labels[:6], len(classes), TINY, device=torch.device("cpu"))
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-5)


def test_non_finite_loss_stops_the_fold(digit_files):
    paths, labels, classes = digit_files
    # An absurd learning rate makes Adam blow the weights up within a few steps.
    cfg = TINY.model_copy(update={"lr": 1e30, "lr_min": 1e29, "epochs": 3, "batch_size": 4})
    with pytest.raises(NonFiniteLoss, match="lower the lr"):
        fit(paths, labels, paths[:4], labels[:4], len(classes), cfg, device=torch.device("cpu"))


def test_pretrained_file_keeps_backbone_and_resizes_head(tmp_path):
    source = create_model(TINY, num_classes=10)
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    cfg = TINY.model_copy(update={"pretrained": True, "pretrained_file": str(weights)})
    model = create_model(cfg, num_classes=3)
    head = model.get_classifier()
    assert head.out_features == 3
    src, dst = source.state_dict(), model.state_dict()
    body = [k for k in src if not k.startswith(("fc.", "head."))]
    assert body and all(torch.equal(src[k], dst[k]) for k in body)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    cfg = TINY.model_copy(update={"pretrained": True, "pretrained_file": str(tmp_path / "x")})
    with pytest.raises(FileNotFoundError, match="pretrained_file"):
        create_model(cfg, num_classes=3)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_model(TINY.model_copy(update={"backbone": "resnet_does_not_exist"}), 3)


def test_weights_round_trip_and_tamper_check():
    model = create_model(TINY, 3)
    data = to_bytes(model)
    other = create_model(TINY.model_copy(update={"seed": 1}), 3)
    load_weights(other, data, sha256(data))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  other.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="sha256"):
        load_weights(other, data[:-1] + b"\x00", sha256(data))


def test_config_rejects_lr_min_above_lr():
    with pytest.raises(ValueError, match="lr_min"):
        TrainConfig(lr=1e-4, lr_min=1e-3)
