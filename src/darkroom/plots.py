"""PNG plots saved next to a model: training curves and the confusion matrix."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curves_png(histories: dict[int, list[dict]]) -> bytes:
    """Train/validation loss and validation accuracy per epoch, one line per fold."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for fold, hist in sorted(histories.items()):
        ep = [h["epoch"] + 1 for h in hist]
        line, = ax_loss.plot(ep, [h["train_loss"] for h in hist], "--", alpha=0.6)
        ax_loss.plot(ep, [h["val_loss"] for h in hist], color=line.get_color(),
                     label=f"fold {fold}")
        ax_acc.plot(ep, [h["val_accuracy"] for h in hist], color=line.get_color(),
                    label=f"fold {fold}")
    ax_loss.set(title="loss (dashed: train, solid: validation)", xlabel="epoch")
    ax_acc.set(title="validation accuracy", xlabel="epoch")
    ax_acc.legend(fontsize=8)
    return _png(fig)


def confusion_png(cm: list[list[int]], classes: list[str], title: str) -> bytes:
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
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    return _png(fig)
