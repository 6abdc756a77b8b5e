"""Every plot saved with a model is a valid PNG, also in edge cases."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from darkroom.training import plots
from darkroom.training.records import EpochRow

PNG = b"\x89PNG\r\n\x1a\n"


def _check(data: bytes) -> Image.Image:
    assert data[:8] == PNG
    img = Image.open(io.BytesIO(data))
    img.verify()
    return Image.open(io.BytesIO(data))


def _history(epochs: int, val: bool = True) -> list[EpochRow]:
    rows = []
    for e in range(epochs):
        row = {"epoch": e, "lr": 1e-3, "frozen_backbone": False, "seconds": 1.0}
        row.update(train_loss=1 / (e + 1), train_accuracy=e / epochs, train_f1_macro=0.5)
        if val:
            row.update(val_loss=1.2 / (e + 1) + 0.1 * e, val_accuracy=e / (epochs + 1))
        rows.append(EpochRow.from_record(row))
    return rows


def test_curves_one_panel_per_fold():
    one = _check(plots.curves_png({0: _history(3)}))
    five = _check(plots.curves_png({k: _history(4) for k in range(5)}))
    assert five.width > one.width  # a column per fold


def test_curves_without_validation_rows():
    _check(plots.curves_png({0: _history(2, val=False)}))


def test_confusion_matrix_png():
    _check(plots.confusion_png([[3, 1], [0, 4]], ["cat", "dog"], "title"))


def test_per_class_png_skips_classes_without_samples():
    _check(plots.per_class_png({"a": 0.5, "b": 1.0, "c": None}, {"a": 40, "b": 7, "c": 0}))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_mistakes_gallery(n):
    rgb = np.zeros((16, 16, 3), np.uint8)
    items = [(rgb if i % 2 else None, "3", "8", 0.9 - i / 10) for i in range(n)]
    _check(plots.mistakes_png(items))


def test_lr_finder_png():
    lrs = list(np.geomspace(1e-6, 1, 20))
    _check(plots.lr_finder_png(lrs, list(np.linspace(2, 1, 20)), 1e-3))
    _check(plots.lr_finder_png(lrs[:2], [2.0, 1.9], None))
