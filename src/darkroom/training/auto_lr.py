"""``lr: auto``: the range test picks the learning rate of a version before its folds train.

The test runs once per version, on the first fold's training rows (fold 0's validation rows
stay unseen, as they are for fold 0 itself), and its result is kept with the version:
``models/<version>/lr_finder.json`` (the chosen lr, the tested range, the reason) and
``lr_finder.png`` (the curve). A resumed or retried run, and every fold, reads the lr from there,
so all folds train at the same rate. The version id is made from the config as written
(``lr: auto``), so an unchanged night still finds its champion and trains nothing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from darkroom import layout
from darkroom.config import RetrainConfig, TrainConfig
from darkroom.data.labels import DatasetError
from darkroom.storage import Storage

log = logging.getLogger(__name__)

RECORD = "lr_finder.json"
PLOT = "lr_finder.png"
STEPS = 100


@dataclass
class LrChoice:
    """What ``lr: auto`` chose for a version, and why (``models/<version>/lr_finder.json``)."""

    lr: float
    tested_from: float  # the lowest and highest lr the test reached
    tested_to: float
    min_loss_lr: float
    steps: int
    train_images: int
    reason: str
    plot: str = PLOT
    curve: dict = field(default_factory=dict)  # the test's lrs and smoothed losses

    def as_dict(self) -> dict:
        return asdict(self)


def is_auto(cfg: TrainConfig) -> bool:
    return cfg.lr == "auto"


def with_lr(cfg: TrainConfig, lr: float) -> TrainConfig:
    """``cfg`` training at ``lr``, its cosine ending at ``lr_min`` or ``lr``, whichever is lower."""
    return cfg.model_copy(update={"lr": lr, "lr_min": min(cfg.lr_min, lr)})


def read_choice(storage: Storage, version: str) -> LrChoice | None:
    record = storage.read_json(layout.version(version, RECORD), missing_ok=True)
    return None if record is None else LrChoice(**record)


def resolve(storage: Storage, config: RetrainConfig, snapshot: str, version: str) -> RetrainConfig:
    """``config`` with the lr a fold trains at: as given, or the version's range test's choice
    (run now when the version has none yet)."""
    if not is_auto(config.train):
        return config
    choice = choose(storage, config, snapshot, version)
    return config.model_copy(update={"train": with_lr(config.train, choice.lr)})


def choose(storage: Storage, config: RetrainConfig, snapshot: str, version: str) -> LrChoice:
    """The version's lr choice: read back when it was made already, else the range test on the
    first fold's training rows, written with its plot before it is returned."""
    if (done := read_choice(storage, version)) is not None:
        return done
    from darkroom.data.fetch import local_paths
    from darkroom.data.index import read_index
    from darkroom.model.backbone import resolve_device
    from darkroom.training import plots
    from darkroom.training.fit import release_memory
    from darkroom.training.lr_finder import START_LR, range_test

    rows, classes, _ = read_index(storage, snapshot)
    rows = rows[(rows["split"] == "train") & (rows["fold"] != 0)]
    cfg = config.train.model_copy(update={"lr": START_LR})
    try:
        result = range_test(
            local_paths(storage, rows, config.cache_path(storage.uri)),
            rows["class_index"].tolist(),
            len(classes),
            cfg,
            device=resolve_device(config.device),
            num_workers=0,
            steps=STEPS,
        )
    finally:
        release_memory()
    choice = _choice(result, len(rows))
    png = plots.lr_finder_png(result["lrs"], result["losses"], choice.lr)
    storage.write_bytes(layout.version(version, PLOT), png)
    storage.write_json(layout.version(version, RECORD), choice.as_dict())
    log.info("lr auto for %s: %.3g (%s)", version, choice.lr, choice.reason)
    return choice


def _choice(result: dict, images: int) -> LrChoice:
    lrs, losses = result["lrs"], result["losses"]
    if result["suggested_lr"] is None:
        raise DatasetError(
            f"lr auto: the range test stopped after {len(losses)} steps (the loss was not "
            f"finite), too few to choose a learning rate on {images} images: give --lr a number"
        )
    lr, at_min = result["suggested_lr"], result["min_loss_lr"]
    return LrChoice(
        lr=lr,
        tested_from=lrs[0],
        tested_to=lrs[-1],
        min_loss_lr=at_min,
        steps=len(losses),
        train_images=images,
        curve={"lrs": list(lrs), "losses": list(losses)},
        reason=(
            f"the smoothed training loss fell fastest at lr {lr:.3g} (lowest loss at "
            f"{at_min:.3g}) in a {len(losses)}-step range test from {lrs[0]:.1e} to "
            f"{lrs[-1]:.3g} on fold 0's {images} training images"
        ),
    )
