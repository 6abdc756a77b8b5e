"""Each training option changes what it should: the loss by hand for label smoothing and class
weights, the optimizer's class and settings, the mixed targets of MixUp and CutMix in a
training step, and a fold's trainer built with every choice the config makes."""

from __future__ import annotations

import math

import pytest
import torch

from darkroom.training.recipe import build_criterion, build_optimizer
from darkroom.training.records import FoldData
from darkroom.training.steps import StepOptions, _forward, mix_batch
from darkroom.training.trainer import Trainer
from tests.conftest import TINY, png_bytes

CPU = torch.device("cpu")
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.2, 2.5], [1.0, 1.0, 0.0]])
TARGETS = torch.tensor([0, 1, 2, 1])


def log_softmax_rows() -> list[list[float]]:
    rows = []
    for row in LOGITS.tolist():
        z = math.log(sum(math.exp(v) for v in row))
        rows.append([v - z for v in row])
    return rows


def test_label_smoothing_gives_the_smoothed_cross_entropy():
    eps, k = 0.2, 3
    criterion = build_criterion(TINY.model_copy(update={"label_smoothing": eps}), [0, 1], k, CPU)
    # each target: (1 - eps) on its class + eps / k on every class
    by_hand = [
        -((1 - eps) * logp[y] + eps / k * sum(logp))
        for logp, y in zip(log_softmax_rows(), TARGETS.tolist(), strict=True)
    ]
    assert criterion(LOGITS, TARGETS).item() == pytest.approx(sum(by_hand) / len(by_hand))
    plain = build_criterion(TINY, [0, 1], k, CPU)(LOGITS, TARGETS).item()
    nll = [-logp[y] for logp, y in zip(log_softmax_rows(), TARGETS.tolist(), strict=True)]
    assert plain == pytest.approx(sum(nll) / len(nll))


def test_balanced_class_weights_weigh_each_class_the_same_in_the_loss():
    train_labels = [0, 0, 0, 0, 0, 0, 1, 1, 2]  # class 0 six times as common as class 2
    cfg = TINY.model_copy(update={"class_weights": "balanced"})
    criterion = build_criterion(cfg, train_labels, 3, CPU)
    w = [9 / (3 * 6), 9 / (3 * 2), 9 / (3 * 1)]  # n / (classes * count)
    nll = [-logp[y] for logp, y in zip(log_softmax_rows(), TARGETS.tolist(), strict=True)]
    ws = [w[y] for y in TARGETS.tolist()]
    by_hand = sum(wi * li for wi, li in zip(ws, nll, strict=True)) / sum(ws)
    assert criterion(LOGITS, TARGETS).item() == pytest.approx(by_hand)
    assert build_criterion(TINY, train_labels, 3, CPU)(LOGITS, TARGETS).item() == pytest.approx(
        sum(nll) / len(nll)
    )


@pytest.mark.parametrize(
    ("name", "cls", "extra"),
    [
        ("adam", torch.optim.Adam, {}),
        ("adamw", torch.optim.AdamW, {}),
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ],
)
def test_the_optimizer_is_the_configs_at_its_lr_and_weight_decay(name, cls, extra):
    cfg = TINY.model_copy(update={"optimizer": name, "lr": 0.03, "weight_decay": 0.01})
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.03 and group["weight_decay"] == 0.01
    assert {k: group[k] for k in extra} == extra


@pytest.mark.parametrize("option", ["mixup_prob", "cutmix_prob"])
def test_a_mixed_batch_is_scored_against_both_targets(option):
    """The step's loss is lam * CE(targets) + (1 - lam) * CE(the partners' targets), on the
    mixed images, with lam what the mixing drew."""
    cfg = TINY.model_copy(update={option: 1.0})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.CrossEntropyLoss()
    torch.manual_seed(7)
    mixed, y_a, y_b, lam = mix_batch(images, labels, cfg)
    assert 0 < lam < 1 and y_b.tolist() == [0, 2, 1, 0]  # each image's partner: its mirror
    torch.manual_seed(7)  # the step draws the same mixing
    logits, loss = _forward(model, images, labels, ce, StepOptions(cfg=cfg))
    with torch.no_grad():
        expected = lam * ce(model(mixed), y_a) + (1 - lam) * ce(model(mixed), y_b)
        assert torch.allclose(logits, model(mixed))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(ce(model(mixed), y_a).item(), rel=1e-3)


def test_a_folds_trainer_is_built_with_every_choice_the_config_makes(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes(40 * i, size=32))
        paths.append(str(path))
    labels = [0, 0, 0, 0, 1, 2]
    data = FoldData(paths[:4] + paths[5:], labels[:4] + labels[5:], paths[4:5], [1], 3)
    cfg = TINY.model_copy(
        update={
            "optimizer": "sgd",
            "lr": 0.05,
            "label_smoothing": 0.1,
            "class_weights": "balanced",
            "mixup_prob": 0.5,
        }
    )
    t = Trainer.build(data, cfg, CPU, num_workers=0, batch=4, accum=1)
    try:
        assert type(t.optimizer) is torch.optim.SGD and t.optimizer.param_groups[0]["lr"] == 0.05
        assert t.criterion.label_smoothing == 0.1
        assert t.criterion.weight.tolist() == pytest.approx([5 / 12, 0.0, 5 / 3])
        assert t.opts.cfg is cfg  # the step mixes
        plain = Trainer.build(data, TINY, CPU, num_workers=0, batch=4, accum=1)
        assert type(plain.optimizer) is torch.optim.Adam and plain.criterion.weight is None
        assert plain.criterion.label_smoothing == 0.0 and plain.opts.cfg is None
        plain.close()
    finally:
        t.close()
