"""Where the demo's retrain spends its wall time outside the epochs (issue 11, p5).

Runs the ``nightly_retrain`` flow in-process on the demo's digits (``darkroom.cli.demo`` data, the
``DEMO_TRAIN`` recipe) in a temporary local storage root, with timers wrapped around the
flow's tasks and the fold's steps. Inside the epochs is the sum of the folds' history
``seconds`` (each epoch's train + validation passes); everything else is outside.

    python benchmarks/bench_demo.py [--quick]

``p5_outside_epochs_share`` = 1 - seconds inside epochs / flow wall seconds (target <= 0.05).
The Prefect temporary server is started (and timed) before the flow, not inside its wall.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from unittest import mock

# (what the timer is called, module, owner inside it or None, attribute). Task functions are
# timed through their ``fn``: the task's wall minus this is Prefect's own cost.
TASKS = [
    ("task check_pretrained", "tasks.train", "check_pretrained", "fn"),
    ("task sync_labeled", "tasks.sync", "sync_labeled", "fn"),
    ("task rebuild_index", "tasks.index", "rebuild_index", "fn"),
    ("task data_changes", "tasks.index", "data_changes", "fn"),
    ("task publish_data_changes", "tasks.reporting", "publish_data_changes", "fn"),
    ("task train_fold", "tasks.train", "train_fold", "fn"),
    ("task finalize_candidate", "tasks.train", "finalize_candidate", "fn"),
    ("task evaluate_candidate", "tasks.promotion", "evaluate_candidate", "fn"),
    ("task promote_candidate", "tasks.promotion", "promote_candidate", "fn"),
    ("task publish_retrain", "tasks.reporting", "publish_retrain", "fn"),
]
# Pieces of a fold: "fit: " inside ``fit`` (around its epochs), "fold: " in train_fold around
# ``fit``, "finalize: " inside the finalize task.
STEPS = [
    ("fold: fit", "darkroom.training.fold", None, "fit_run"),
    ("fit: Trainer.build (model, loaders)", "darkroom.training.trainer", "Trainer", "build"),
    ("fit: checkpoint saves", "darkroom.training.checkpoint", "SaveSchedule", "save"),
    ("fit: checkpoint saves", "darkroom.training.fit", "Trainer", "save"),  # before SaveSchedule
    ("fit: checkpoint load", "darkroom.training.fold", "StorageCheckpointer", "load"),
    ("fit: on_epoch (progress artifact, log)", "tasks.train", "EpochProgress", "__call__"),
    ("fit: Trainer.result (best weights)", "darkroom.training.trainer", "Trainer", "result"),
    ("fit: Trainer.close (stop workers)", "darkroom.training.trainer", "Trainer", "close"),
    ("fold: local paths (_fold_data)", "darkroom.training.fold", None, "_fold_data"),
    ("fold: release_memory (gc)", "darkroom.training.fold", None, "release_memory"),
    ("fold: weights to safetensors", "darkroom.training.fold", None, "to_bytes"),
    (
        "fold: metrics, oof, fold.json (_finish_fold)",
        "darkroom.training.fold",
        None,
        "_finish_fold",
    ),
    ("finalize: plots and oof reports", "darkroom.training.candidate", None, "_write_reports"),
    ("finalize: timm configs", "darkroom.training.candidate", None, "_write_timm_configs"),
]


class Clock:
    """Seconds and calls per name, from wrappers patched around functions for one run."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def timed(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return wrapper

    def patch(self, stack: ExitStack, name: str, module: str, owner: str | None, attr: str):
        """Times ``module.owner.attr``; one this version of the code lacks is left out, so
        that the same benchmark runs on older code."""
        import importlib

        try:
            target = importlib.import_module(module)
            target = getattr(target, owner) if owner else target
            static = inspect.getattr_static(target, attr)
        except (ImportError, AttributeError):
            return
        if isinstance(static, (classmethod, staticmethod)):
            new = staticmethod(self.timed(name, getattr(target, attr)))
        else:
            new = self.timed(name, static)
        stack.enter_context(mock.patch.object(target, attr, new))


def _warm_prefect() -> float:
    """Starts Prefect's temporary server with a trivial flow; its start-up is not the flow's."""
    from prefect import flow

    t0 = time.perf_counter()
    flow(name="bench-demo-warm-up")(lambda: None)()
    return time.perf_counter() - t0


def _checkpoint_sizes(saves: list[int]) -> dict:
    return {
        "saves": len(saves),
        "bytes_per_save_mean": round(sum(saves) / len(saves)) if saves else 0,
        "bytes_per_save_max": max(saves, default=0),
        "bytes_total": sum(saves),
    }


def run(quick: bool = False, checkpoint_every_seconds: float | None = None) -> dict:
    """Runs the demo's retrain once and splits its wall time into inside/outside the epochs.

    Args:
        quick: 120 digits, 2 folds, 2 epochs instead of every digit, 5 folds, 8 epochs.
        checkpoint_every_seconds: overrides the config's default (0: a save every epoch).
    """
    import darkroom.training.fold as core_train
    from darkroom import layout
    from darkroom.cli.demo import DEMO_TRAIN, write_demo_data
    from darkroom.config import RetrainConfig
    from darkroom.storage import open_storage
    from flows.retrain import nightly_retrain

    train = DEMO_TRAIN.model_copy(update={"epochs": 2, "folds": 2} if quick else {})
    clock, checkpointers = Clock(), []

    class RecordedCheckpointer(core_train.StorageCheckpointer):
        def __init__(self, *args):
            super().__init__(*args)
            checkpointers.append(self)

    warm_up = _warm_prefect()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp, ExitStack() as stack:
        storage = open_storage(f"file://{tmp}/bucket")
        counts = write_demo_data(storage, limit=120 if quick else None)
        config = RetrainConfig(
            storage=storage.uri, cache_dir=f"{tmp}/cache", device="cpu", train=train
        )
        if checkpoint_every_seconds is not None:
            config = config.model_copy(
                update={"checkpoint_every_seconds": checkpoint_every_seconds}
            )
        for item in TASKS + STEPS:
            clock.patch(stack, *item)
        stack.enter_context(
            mock.patch.object(core_train, "StorageCheckpointer", RecordedCheckpointer)
        )
        t0 = time.perf_counter()
        out = nightly_retrain(config)
        wall = time.perf_counter() - t0
        version = out["version"]
        folds = range(train.folds + (train.final_model == "refit"))
        histories = [
            storage.read_json(layout.fold(version, k, "fold.json"))["history"] for k in folds
        ]
    saves = [n for c in checkpointers for n in c.sizes]
    return _result(quick, wall, warm_up, clock, histories, saves, counts, config)


def _result(quick, wall, warm_up, clock, histories, saves, counts, config) -> dict:
    inside = sum(row["seconds"] for h in histories for row in h)
    sec = clock.seconds
    steps = lambda prefix: sum(s for k, s in sec.items() if k.startswith(prefix))  # noqa: E731
    containers = ("task train_fold", "task finalize_candidate", "fold: fit")
    items = {k: s for k, s in sec.items() if k not in containers}
    # each container less what is timed inside it
    items["fit: rest (loop, best-weight copies)"] = sec["fold: fit"] - inside - steps("fit: ")
    items["fold: rest (index, weights write, ...)"] = sec["task train_fold"] - steps("fold: ")
    items["finalize: rest"] = sec["task finalize_candidate"] - steps("finalize: ")
    items["flow: Prefect and flow code between tasks"] = wall - steps("task ")
    top = sorted(items.items(), key=lambda kv: -kv[1])
    return {
        "p5_outside_epochs_share": round(1 - inside / wall, 4),
        "details": {
            "quick": quick,
            "images": counts,
            "folds": config.train.folds,
            "epochs": config.train.epochs,
            "checkpoint_every_seconds": getattr(config, "checkpoint_every_seconds", None),
            "flow_wall_seconds": round(wall, 2),
            "inside_epochs_seconds": round(inside, 2),
            "outside_epochs_seconds": round(wall - inside, 2),
            "between_epochs_seconds": round(
                sec["fit: checkpoint saves"]
                + sec["fit: on_epoch (progress artifact, log)"]
                + items["fit: rest (loop, best-weight copies)"],
                3,
            ),
            "prefect_server_start_seconds": round(warm_up, 2),
            "largest_outside_items": [
                {"item": k, "seconds": round(s, 3), "calls": clock.calls.get(k, 0)}
                for k, s in top[:12]
            ],
            "checkpoint": _checkpoint_sizes(saves),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images, folds and epochs")
    p.add_argument(
        "--compare", action="store_true", help="then again with a checkpoint after every epoch"
    )
    a = p.parse_args(argv)
    result = run(quick=a.quick)
    _print(result)
    if a.compare:
        every = run(quick=a.quick, checkpoint_every_seconds=0)
        _print(every)
        result["details"]["every_epoch"] = every
        print(
            f"outside-epoch seconds, default interval / every epoch: "
            f"{result['details']['outside_epochs_seconds']} / "
            f"{every['details']['outside_epochs_seconds']}"
        )
    print(json.dumps(result, indent=2))
    return 0


def _print(result: dict) -> None:
    d = result["details"]
    print(
        f"checkpoint_every_seconds={d['checkpoint_every_seconds']}: flow wall "
        f"{d['flow_wall_seconds']} s, inside epochs {d['inside_epochs_seconds']} s, "
        f"outside share {result['p5_outside_epochs_share']:.1%} (target <= 5%)"
    )
    for item in d["largest_outside_items"]:
        print(f"  {item['seconds']:8.3f} s  {item['calls']:4d} calls  {item['item']}")
    c = d["checkpoint"]
    print(f"checkpoint: {c['saves']} saves, {c['bytes_per_save_mean']:,} bytes each on average")


if __name__ == "__main__":
    raise SystemExit(main())
