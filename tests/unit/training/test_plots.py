"""Every plot saved with a model is a valid PNG, also in edge cases, and draws what it says:
the figure's data (lines, points, cells, captions), and for the mistakes gallery, which
images it picks (read from the PNG's pixels)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from darkroom.training import plots
from darkroom.training.candidate import _mistakes_png
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


def _lines(ax) -> list[tuple[list, list]]:
    return [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]


def test_curves_one_panel_per_fold():
    one = _check(plots.curves_png({0: _history(3)}))
    five = _check(plots.curves_png({k: _history(4) for k in range(5)}))
    assert five.width > one.width  # a column per fold


def test_curves_draw_each_folds_losses_accuracies_and_the_epoch_kept():
    hist = {0: _history(3), 1: _history(2)}
    fig = plots.curves_figure(hist)
    axes = np.array(fig.axes).reshape(2, 2)
    for col, fold in enumerate((0, 1)):
        h, ep = hist[fold], [e + 1 for e in range(len(hist[fold]))]
        best = ep[int(np.argmin([r.val_loss for r in h]))]  # fold 0: epoch 3, fold 1: epoch 2
        for row, what in enumerate(("loss", "accuracy")):
            train, val, kept = _lines(axes[row][col])
            assert train == (ep, [getattr(r, f"train_{what}") for r in h])
            assert val == (ep, [getattr(r, f"val_{what}") for r in h])
            assert kept[0] == [best, best]
            assert axes[row][col].get_title() == f"fold {fold} {what}"


def test_curves_without_validation_rows():
    _check(plots.curves_png({0: _history(2, val=False)}))
    fig = plots.curves_figure({0: _history(2, val=False)})
    for ax in fig.axes:  # the train line alone: no validation line, no epoch kept
        assert len(ax.get_lines()) == 1


def test_confusion_matrix_png():
    _check(plots.confusion_png([[3, 1], [0, 4]], ["cat", "dog"], "title"))
    (ax,) = plots.confusion_figure([[3, 1], [0, 4]], ["cat", "dog"], "title").axes
    assert ax.images[0].get_array().tolist() == [[3, 1], [0, 4]]
    assert [t.get_text() for t in ax.texts] == ["3", "1", "0", "4"]  # row by row
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog"]


def test_per_class_png_skips_classes_without_samples():
    accuracy, counts = {"a": 0.5, "b": 1.0, "c": None}, {"a": 40, "b": 7, "c": 0}
    _check(plots.per_class_png(accuracy, counts))
    (ax,) = plots.per_class_figure(accuracy, counts).axes
    assert ax.collections[0].get_offsets().tolist() == [[40, 0.5], [7, 1.0]]
    assert [t.get_text() for t in ax.texts] == ["a", "b"]  # no point, no name for "c"


@pytest.mark.parametrize("n", [0, 1, 5])
def test_mistakes_gallery(n):
    rgb = np.zeros((16, 16, 3), np.uint8)
    items = [(rgb if i % 2 else None, "3", "8", 0.9 - i / 10) for i in range(n)]
    _check(plots.mistakes_png(items))
    fig = plots.gallery_figure(
        [(image, f"true {t}\npred {p} ({c:.2f})") for image, t, p, c in items], "t", "none"
    )
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == n // 2  # a picture where there is one, a caption alone elsewhere
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"true 3\npred 8 ({0.9 - i / 10:.2f})" for i in range(n)]
    if n == 0:
        assert [t.get_text() for t in fig.axes[0].texts] == ["none"]


COLOURS = {  # one solid colour per image: where it shows in the PNG, that image was drawn
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255),
}  # fmt: skip


def test_the_mistakes_gallery_shows_the_most_confident_wrong_predictions_in_order(local_storage):
    rows = [  # (colour, true class, predicted class, confidence)
        ("magenta", 0, 0, 0.99),  # right: never a mistake, however confident
        ("yellow", 1, 0, 0.55),  # wrong, but the least confident: left out at n=3
        ("blue", 0, 1, 0.70),
        ("red", 1, 0, 0.90),
        ("green", 0, 1, 0.80),
    ]
    for colour, *_ in rows:
        bgr = np.full((24, 24, 3), COLOURS[colour][::-1], np.uint8)
        local_storage.put_source_object(f"labeled/{colour}.png", cv2.imencode(".png", bgr)[1])
    oof = pd.DataFrame(
        [
            {"key": f"labeled/{c}.png", "label": "ab"[t], "class_index": t, "pred_index": p,
             "confidence": conf}
            for c, t, p, conf in rows
        ]
    )  # fmt: skip
    png = np.asarray(_check(_mistakes_png(local_storage, oof, ["a", "b"], n=3)).convert("RGB"))
    where = {}
    for name, rgb in COLOURS.items():
        ys, xs = np.nonzero((png == rgb).all(-1))
        if len(xs) > 50:
            where[name] = xs.mean()
    assert sorted(where, key=where.get) == ["red", "green", "blue"]  # most confident first


def test_lr_finder_png():
    lrs = list(np.geomspace(1e-6, 1, 20))
    _check(plots.lr_finder_png(lrs, list(np.linspace(2, 1, 20)), 1e-3))
    _check(plots.lr_finder_png(lrs[:2], [2.0, 1.9], None))
    (ax,) = plots.lr_finder_figure(lrs, list(np.linspace(2, 1, 20)), 1e-3).axes
    (curve, suggested) = _lines(ax)
    assert curve == (lrs, list(np.linspace(2, 1, 20))) and suggested[0] == [1e-3, 1e-3]
    assert ax.get_xscale() == "log"
    (ax,) = plots.lr_finder_figure(lrs[:2], [2.0, 1.9], None).axes
    assert len(ax.get_lines()) == 1  # no suggestion, no line
