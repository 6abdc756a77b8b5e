"""One fold on several devices, torchrun-style (``devices_per_fold`` > 1).

The fold's own process writes the fold's plan (its images, recipe, checkpoint key) into a
private folder and starts ``python -m darkroom.training.launch launch``: torch's standard launcher
(``torch.distributed.run --standalone``, one rank per device, no restarts), which starts the
ranks (``python -m darkroom.training.launch rank``). Every rank resumes from the fold's checkpoint and
trains its share (``fit`` with its ``distributed.Ranks``); rank 0 alone saves checkpoints to
storage and leaves the result (weights and record) in the folder, which the fold's process turns
into the fold's files exactly as for one device.

No process is left behind: each dies with the process that started it (Linux's
``PR_SET_PDEATHSIG``), torchrun passes SIGTERM on to the ranks and stops them all when one
fails, and the fold's process stops the launcher when the fold times out or is interrupted. A
rank's failure fails the fold with that rank's error (retried, unless it cannot help)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from darkroom.ops import stopping

# The launcher process needs torch's launcher alone: darkroom's training modules (timm,
# OpenCV, scikit-learn: seconds to import) load where they run, in the ranks.
if TYPE_CHECKING:
    from darkroom.config import RetrainConfig, TrainConfig
    from darkroom.training.distributed import Ranks
    from darkroom.training.records import FoldData, FoldResult

log = logging.getLogger(__name__)

MARK = "darkroom-epoch "  # rank 0's lines that carry an epoch's history row
PARENT, LAUNCHER = "DARKROOM_FOLD_PID", "DARKROOM_LAUNCHER_PID"
GRACE_SECONDS = 45  # torchrun gives its ranks 30 s after SIGTERM before SIGKILL
# A rank's error of these kinds fails the fold as itself: a retry would fail alike.
PERMANENT = ("NonFiniteLoss", "ValueError")
TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}  # a stray byte ends nothing


class RanksFailed(RuntimeError):
    """A process of a fold on several devices failed (the task retries the fold)."""


def fit_in_processes(
    data: FoldData, cfg: TrainConfig, config: RetrainConfig, device: str, checkpoint, on_epoch
) -> tuple[FoldResult, bytes]:
    """``fit`` on ``config.devices_per_fold`` processes; returns what rank 0 trained (the
    result without its model) and the weights as safetensors bytes.

    Args:
        device: auto, cpu, cuda, or the GPUs this fold holds (``cuda:2,3``).
        checkpoint: The fold's ``train.StorageCheckpointer``; every rank resumes from it.
        on_epoch: Called here with each epoch's history row.

    Raises:
        NonFiniteLoss, ValueError: a rank failed with one (a retry would fail alike).
        RanksFailed: a rank failed otherwise, or the processes exited without a result.
        TimeoutError: the fold ran past ``config.fold_timeout_seconds``.
    """
    n = config.devices_per_fold
    kind, env = _devices(device, n)
    sweep_stale_runs(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"darkroom-fold-{os.getpid()}-") as tmp:
        run = Path(tmp)
        plan = {
            "data": asdict(data),
            "train": cfg.model_dump(mode="json"),
            "device": kind,
            "num_workers": config.num_workers,
            "checkpoint_every": config.checkpoint_every_seconds,
            "storage": checkpoint.storage.uri,
            "checkpoint": checkpoint.key,
        }
        (run / "plan.json").write_text(json.dumps(plan))
        cmd = [sys.executable, "-m", "darkroom.training.launch", "launch", str(run), str(n)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **TEXT
        )
        try:
            tail = _follow(proc, on_epoch, config.fold_timeout_seconds)
            proc.wait(GRACE_SECONDS)
        finally:
            _stop(proc)
        if proc.returncode or not (run / "result.pt").exists():
            raise _failure(run, n, proc.returncode, tail)
        return _result(run)


def sweep_stale_runs(root: Path) -> None:
    """Removes the plan folders (``darkroom-fold-<pid>-*``) of fold processes that are gone: a
    SIGKILLed fold cannot remove its own, and each holds the fold's weights."""
    for folder in root.glob("darkroom-fold-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _devices(device: str, n: int) -> tuple[str, dict]:
    """("cuda" or "cpu", the launcher's environment) for ``device``: a held ``cuda:i,j`` shows
    the ranks those GPUs alone; a CPU's cores are shared out among the ranks."""
    from darkroom.ops.cores import usable_cores

    env = {**os.environ, PARENT: str(os.getpid())}
    name = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if name == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // n)))
        return "cpu", env
    if name == "cuda" and torch.cuda.device_count() >= n:
        return "cuda", env
    ids = name.removeprefix("cuda:").split(",") if name.startswith("cuda:") else []
    if len(ids) != n:
        raise ValueError(
            f"devices_per_fold={n} needs {n} GPUs, but device is {device!r} with "
            f"{torch.cuda.device_count()} visible: use device auto or cuda, or fewer devices"
        )
    visible = env.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(
        visible.split(",")[int(i)] if visible else i for i in ids
    )
    return "cuda", env


def _follow(proc: subprocess.Popen, on_epoch, timeout: float) -> deque[str]:
    """Hands rank 0's epoch rows to ``on_epoch`` and logs every other line, until the
    processes' output ends; returns the last lines, for an error message.

    Raises:
        TimeoutError: still running after ``timeout`` seconds.
    """
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: deque[str] = deque(maxlen=40)
    deadline = time.monotonic() + timeout
    while (line := _next(lines, deadline, timeout)) is not None:
        if line.startswith(MARK):
            if on_epoch is not None:
                on_epoch(json.loads(line.removeprefix(MARK)))
        else:
            tail.append(line)
            log.info("%s", line)
    return tail


def _pump(stream, lines: queue.Queue) -> None:
    try:
        for line in stream:
            lines.put(line.rstrip("\n"))
    finally:  # the end of the output, however it came
        lines.put(None)


def _next(lines: queue.Queue, deadline: float, timeout: float) -> str | None:
    # Waits a second at a time, so that the deadline, a run that is stopping, and an
    # exception raised into this thread (Prefect's way to time out a task) are seen.
    while time.monotonic() < deadline:
        stopping.check()
        try:
            return lines.get(timeout=1.0)
        except queue.Empty:
            pass
    raise TimeoutError(f"the fold's processes were still running after {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stops the launcher if it still runs: SIGTERM, which torchrun passes on to the ranks
    before it exits, then SIGKILL (the ranks then die with it)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _failure(run: Path, n: int, code: int | None, tail) -> Exception:
    """The first rank's error, as its own type where a retry cannot help."""
    from darkroom.training.steps import NonFiniteLoss

    errors = sorted(run.glob("error-*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not errors:
        last = "\n".join(tail)
        return RanksFailed(f"the fold's {n} processes ended with exit code {code}:\n{last}")
    first = json.loads(errors[0].read_text())
    kinds = dict(zip(PERMANENT, (NonFiniteLoss, ValueError), strict=True))
    kind = kinds.get(first["type"], RanksFailed)
    return kind(f"rank {first['rank']} of {n} failed: {first['type']}: {first['message']}")


def _result(run: Path) -> tuple[FoldResult, bytes]:
    from darkroom.training.records import FoldResult

    saved = torch.load(run / "result.pt", map_location="cpu", weights_only=True)
    probs = saved.pop("val_probs").numpy()
    weights = (run / "model.safetensors").read_bytes()
    return FoldResult(model=None, val_probs=probs, **saved), weights


# ---- in the launcher and the ranks -----------------------------------------------------------


def _launch(run: str, n: str) -> int:
    """The launcher: torchrun in this process, so that it dies with the fold's process."""
    _die_with_parent(PARENT)
    os.environ[LAUNCHER] = str(os.getpid())
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc-per-node={n}", "--max-restarts=0"]
    try:
        torchrun([*args, "--module", "darkroom.training.launch", "rank", run])
    except ChildFailedError as exc:
        print(f"darkroom.training.launch: {exc}", file=sys.stderr)
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


def _report(row: dict) -> None:
    print(MARK + json.dumps(row, default=float), flush=True)


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
