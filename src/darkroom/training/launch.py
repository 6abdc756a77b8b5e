"""One fold on several devices, torchrun-style (``devices_per_fold`` > 1).

This module is the fold's side. The fold's own process writes the fold's plan (its images,
recipe, checkpoint key) into a private folder and starts ``python -m darkroom.training.launch
launch``: torch's standard launcher (``torch.distributed.run --standalone``, one rank per
device, no restarts), which starts the ranks (``darkroom.training.rank``: the launcher's and
the ranks' side). Every rank resumes from the fold's checkpoint and trains its share; rank 0
alone saves checkpoints to storage and leaves the result (weights and record) in the folder,
which the fold's process turns into the fold's files exactly as for one device.

No process is left behind: each dies with the process that started it (Linux's
``PR_SET_PDEATHSIG``), torchrun passes SIGTERM on to the ranks and stops them all when one
fails, and the fold's process stops the launcher when the fold times out or is interrupted. A
rank's failure fails the fold with that rank's error (retried, unless it cannot help)."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from darkroom.ops import stopping
from darkroom.training.rank import MARK, PARENT, main

# The launcher process needs torch's launcher alone: darkroom's training modules (timm,
# OpenCV, scikit-learn: seconds to import) load where they run, in the ranks.
if TYPE_CHECKING:
    from darkroom.training.records import FoldResult, FoldRun

log = logging.getLogger(__name__)

GRACE_SECONDS = 45  # torchrun gives its ranks 30 s after SIGTERM before SIGKILL
# A rank's error of these kinds fails the fold as itself: a retry would fail alike.
PERMANENT = ("NonFiniteLoss", "ValueError")
TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}  # a stray byte ends nothing


class RanksFailed(RuntimeError):
    """A process of a fold on several devices failed (the task retries the fold)."""


def fit_in_processes(run: FoldRun) -> tuple[FoldResult, bytes]:
    """``fit`` of ``run`` on ``run.config.devices_per_fold`` processes; returns what rank 0
    trained (the result without its model) and the weights as safetensors bytes.

    ``run.device``: auto, cpu, cuda, or the GPUs this fold holds (``cuda:2,3``); every rank
    resumes from ``run.checkpoint`` (the fold's ``StorageCheckpointer``); ``run.on_epoch`` is
    called here with each epoch's row.

    Raises:
        NonFiniteLoss, ValueError: a rank failed with one (a retry would fail alike).
        RanksFailed: a rank failed otherwise, or the processes exited without a result.
        TimeoutError: the fold ran past ``config.fold_timeout_seconds``.
    """
    config, n = run.config, run.config.devices_per_fold
    kind, env = _devices(run.device, n)
    sweep_stale_runs(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"darkroom-fold-{os.getpid()}-") as tmp:
        folder = Path(tmp)
        plan = {
            "data": asdict(run.data),
            "train": run.train.model_dump(mode="json"),
            "device": kind,
            "num_workers": config.num_workers,
            "checkpoint_every": config.checkpoint_every_seconds,
            "storage": run.checkpoint.storage.uri,
            "checkpoint": run.checkpoint.key,
        }
        (folder / "plan.json").write_text(json.dumps(plan))
        cmd = [sys.executable, "-m", "darkroom.training.launch", "launch", str(folder), str(n)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **TEXT
        )
        try:
            tail = _follow(proc, run.on_epoch, config.fold_timeout_seconds)
            proc.wait(GRACE_SECONDS)
        finally:
            _stop(proc)
        if proc.returncode or not (folder / "result.pt").exists():
            raise _failure(folder, n, proc.returncode, tail)
        return _result(folder)


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
    from darkroom.training.records import EpochRow

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    tail: deque[str] = deque(maxlen=40)
    deadline = time.monotonic() + timeout
    while (line := _next(lines, deadline, timeout)) is not None:
        if line.startswith(MARK):
            if on_epoch is not None:
                on_epoch(EpochRow.from_record(json.loads(line.removeprefix(MARK))))
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


if __name__ == "__main__":
    sys.exit(main())
