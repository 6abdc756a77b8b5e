"""The launcher and the ranks of a fold on several devices (``darkroom.training.launch``
starts them). The launcher (``python -m darkroom.training.launch launch <run> <n>``) runs
torch's standard launcher in its own process, which starts ``n`` ranks (``python -m
darkroom.training.rank rank <run>``). Each rank reads the fold's plan from the run folder,
resumes from the fold's checkpoint and trains its share (``fit`` with its
``distributed.Ranks``); rank 0 alone saves checkpoints, prints each epoch's row for the fold's
process, and leaves the result (weights and record) in the folder. Each process dies with the
one that started it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from darkroom.ops import stopping

# The launcher process needs torch's launcher alone: darkroom's training modules (timm,
# OpenCV, scikit-learn: seconds to import) load where they run, in the ranks.
if TYPE_CHECKING:
    from darkroom.training.distributed import Ranks
    from darkroom.training.records import EpochRow, FoldResult

MARK = "darkroom-epoch "  # rank 0's lines that carry an epoch's history row
PARENT, LAUNCHER = "DARKROOM_FOLD_PID", "DARKROOM_LAUNCHER_PID"


def _launch(run: str, n: str) -> int:
    """The launcher: torchrun in this process, so that it dies with the fold's process."""
    _die_with_parent(PARENT)
    os.environ[LAUNCHER] = str(os.getpid())
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc-per-node={n}", "--max-restarts=0"]
    try:
        torchrun([*args, "--module", "darkroom.training.rank", "rank", run])
    except ChildFailedError as exc:
        print(f"darkroom.training.rank: {exc}", file=sys.stderr)
        return 1
    return 0


def _rank(run: Path) -> None:
    """One rank: trains its share; rank 0 leaves the result. An error is recorded for the
    fold's process (``error-<rank>.json``) before it ends this rank."""
    _die_with_parent(LAUNCHER)
    from darkroom.training.distributed import Ranks

    ranks = Ranks.from_env()
    try:
        plan = json.loads((run / "plan.json").read_text())
        device = ranks.join(plan["device"])
        result = _fit_rank(plan, ranks, device)
        records = ranks.describe(device)
        torch.distributed.destroy_process_group()
        if ranks.main:
            _save_result(run, result, records)
    except BaseException as exc:
        error = {"rank": ranks.rank, "type": type(exc).__name__, "message": str(exc)}
        with contextlib.suppress(OSError):  # the fold's process may be gone, and its folder
            (run / f"error-{ranks.rank}.json").write_text(json.dumps(error))
        raise


def _fit_rank(plan: dict, ranks: Ranks, device: torch.device) -> FoldResult:
    from darkroom.config import TrainConfig
    from darkroom.storage import open_storage
    from darkroom.training.checkpoint import ReadOnly, StorageCheckpointer
    from darkroom.training.fit import fit
    from darkroom.training.records import FoldData, LoaderLimits

    data = {**plan["data"], "limits": LoaderLimits(**plan["data"]["limits"])}
    stored = StorageCheckpointer(open_storage(plan["storage"]), plan["checkpoint"])
    return fit(
        FoldData(**data),
        TrainConfig.model_validate(plan["train"]),
        device=device,
        num_workers=_workers(plan["num_workers"], ranks.world),
        on_epoch=_report if ranks.main else None,
        checkpoint=stored if ranks.main else ReadOnly(stored),
        checkpoint_every=plan["checkpoint_every"],
        ranks=ranks,
    )


def _workers(num_workers: int | str, world: int) -> int | str:
    """``auto`` loader workers of one rank: its share of the cores less one (none on a share
    of two cores or fewer), as ``feed.resolve_workers`` counts for a process alone."""
    if num_workers != "auto":
        return num_workers
    from darkroom.ops.cores import usable_cores

    share = usable_cores() // world
    return share - 1 if share > 2 else 0


def _report(row: EpochRow) -> None:
    print(MARK + json.dumps(row.record(), default=float), flush=True)


def _save_result(run: Path, result: FoldResult, records: list[dict]) -> None:
    from darkroom.model.backbone import to_bytes

    (run / "model.safetensors").write_bytes(to_bytes(result.model))
    saved = {f.name: getattr(result, f.name) for f in fields(result)}
    del saved["model"]
    saved.update(val_probs=torch.from_numpy(result.val_probs), ranks=records)
    torch.save(saved, run / "result.pt")


def _die_with_parent(variable: str) -> None:
    """Has Linux send this process SIGTERM when the process that started it dies, so that a
    killed fold leaves no launcher or rank behind (elsewhere: nothing). ``variable`` holds that
    process's pid, which tells a parent that died before this call."""
    if not stopping.die_with_parent():
        return
    expected = os.environ.get(variable)
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    what, *args = sys.argv[1:] if argv is None else argv
    if what == "launch":
        return _launch(*args)
    _rank(Path(*args))
    # A rank's work is written: end it here. The interpreter's teardown once aborted a rank
    # (SIGABRT, "terminate called without an active exception") after its fold had finished,
    # which failed the fold.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
