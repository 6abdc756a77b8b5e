"""PNG plots saved next to a model: training curves per fold, the confusion matrix, per-class
accuracy against training images, galleries of images (the worst mistakes, the labels that
look wrong), and the learning-rate range test. Each ``*_png`` saves its ``*_figure``, the
matplotlib figure the tests read what is drawn from."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from darkroom.training.records import EpochRow  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(histories: dict[int, list[EpochRow]]) -> bytes:
    return _png(curves_figure(histories))


def curves_figure(histories: dict[int, list[EpochRow]]):
    """One column per fold: train and validation loss (top) and accuracy (bottom) per epoch."""
    folds = sorted(histories)
    fig, axes = plt.subplots(
        2, max(len(folds), 1), figsize=(3.2 * max(len(folds), 1), 5.5), squeeze=False, sharex="col"
    )
    for col, fold in enumerate(folds):
        hist = histories[fold]
        ep = [h.epoch + 1 for h in hist]
        for row, what in enumerate(("loss", "accuracy")):
            ax = axes[row][col]
            ax.plot(ep, [getattr(h, f"train_{what}") for h in hist], "--", label="train")
            if hist and hist[0].val_loss is not None:
                ax.plot(ep, [getattr(h, f"val_{what}") for h in hist], label="validation")
                best = min(range(len(hist)), key=lambda i: hist[i].val_loss)
                ax.axvline(ep[best], color="grey", lw=0.8, ls=":")
            ax.set(title=f"fold {fold} {what}", xlabel="epoch" if row else None)
            ax.legend(fontsize=7)
    fig.suptitle("training curves (dotted line: the epoch kept)")
    return fig


def confusion_png(cm: list[list[int]], classes: list[str], title: str) -> bytes:
    return _png(confusion_figure(cm, classes, title))


def confusion_figure(cm: list[list[int]], classes: list[str], title: str):
    """The counts as a heat map, each cell written in it (up to 30 classes)."""
    cm = np.asarray(cm)
    n = len(classes)
    size = min(2 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90)
    ax.set_yticklabels(classes)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black",
                )
    return fig


def per_class_png(accuracy: dict[str, float | None], train_images: dict[str, int]) -> bytes:
    return _png(per_class_figure(accuracy, train_images))


def per_class_figure(accuracy: dict[str, float | None], train_images: dict[str, int]):
    """Per-class accuracy against the class's number of training images: rare classes that
    do badly sit bottom left. A class without out-of-fold samples (accuracy None) has no
    point."""
    classes = [c for c in accuracy if accuracy[c] is not None]
    x = [train_images.get(c, 0) for c in classes]
    y = [accuracy[c] for c in classes]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(x, y)
    for c, xi, yi in zip(classes, x, y, strict=True):
        ax.annotate(c, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(
        xlabel="training images",
        ylabel="out-of-fold accuracy",
        title="per-class accuracy vs. training images",
        ylim=(-0.02, 1.05),
    )
    return fig


def mistakes_png(items: list[tuple[np.ndarray | None, str, str, float]]) -> bytes:
    """A gallery of mistakes: (RGB image or None, true label, predicted label, confidence)."""
    cells = [(image, f"true {true}\npred {pred} ({conf:.2f})") for image, true, pred, conf in items]
    return gallery_png(cells, "most confident mistakes (out of fold)", "no mistakes")


def gallery_png(cells: list[tuple[np.ndarray | None, str]], title: str, empty: str) -> bytes:
    return _png(gallery_figure(cells, title, empty))


def gallery_figure(cells: list[tuple[np.ndarray | None, str]], title: str, empty: str):
    """Images in a grid of at most four columns, each with its caption (None: caption only)."""
    if not cells:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center")
        return fig
    cols = min(4, len(cells))
    rows = math.ceil(len(cells) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, cells, strict=False):
        if image is not None:
            ax.imshow(image)
        ax.set_title(caption, fontsize=8)
    fig.suptitle(title)
    return fig


def lr_finder_png(lrs: list[float], losses: list[float], suggested: float | None) -> bytes:
    return _png(lr_finder_figure(lrs, losses, suggested))


def lr_finder_figure(lrs: list[float], losses: list[float], suggested: float | None):
    """The smoothed loss against the lr (log scale), the suggested lr as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="training loss (smoothed)",
        title="learning-rate range test",
    )
    if suggested:
        ax.axvline(suggested, color="red", ls="--", label=f"suggested {suggested:.2e}")
        ax.legend()
    return fig
