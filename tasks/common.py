"""What every darkroom task shares: which failures are worth a retry, and logging progress."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from darkroom.ops.stopping import Stopped
from darkroom.storage import StorageSetupError


def not_retried() -> tuple[type[Exception], ...]:
    """What a retry cannot fix: bad data, a diverged run, a bad config, or a run that is
    stopping (it can fix I/O and preemption). Imported when first needed: a flow's start-up
    does not load torch for it."""
    from darkroom.data.labels import DatasetError
    from darkroom.training.fit import NonFiniteLoss

    return (DatasetError, NonFiniteLoss, Stopped, StorageSetupError, ValueError, PermissionError)


class _ThreadTimeoutNote(logging.Filter):
    """Drops Prefect's warning, logged at the start of every task with a timeout on a worker
    thread, that such a timeout waits for a blocking call to return. darkroom's folds and
    chunks are loops of short steps whose storage calls have timeouts of their own, so the
    timeout stops them within a step (tests/flows/test_timeouts.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of %s seconds configured for this task")


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNote())


def __getattr__(name: str):
    if name == "NOT_RETRIED":
        return not_retried()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def retry_unless_permanent(task, task_run, state) -> bool:
    try:
        state.result()
    except not_retried():
        return False
    except Exception:
        return True
    return True


# A task that does I/O: retried with backoff unless the error is permanent, never cached
# (inputs are references; the outputs live in storage). Keywords override these defaults.
io_task = functools.partial(
    task,
    retries=3,
    retry_delay_seconds=[5, 30, 120],
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)


def interactive() -> bool:
    """True on a terminal outside CI: show progress bars; else plain log lines."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return sys.stderr.isatty()


class ProgressBar:
    """A terminal progress bar (tqdm: count, rate, ETA) fed with (done, total); it closes
    itself when done reaches total."""

    def __init__(self, what: str, unit: str = "img", position: int | None = None):
        self.what, self.unit, self.position = what, unit, position
        self.bar = None

    def __call__(self, done: int, total: int, **postfix) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=self.what,
                unit=self.unit,
                position=self.position,
                dynamic_ncols=True,
                leave=True,
                file=sys.stderr,
            )
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(what: str, unit: str = "img", position: int | None = None) -> ProgressBar | None:
    """A ProgressBar when attached to a terminal (and tqdm is there), else None."""
    if not interactive():
        return None
    try:
        import tqdm  # noqa: F401  (comes with timm's huggingface_hub)
    except ImportError:
        return None
    return ProgressBar(what, unit, position)


def log_progress(what: str, every: int = 10):
    """A progress callback (done, total): a bar with rate and ETA on a terminal, else a log
    line every ``every`` percent (CI, workers, anything not a TTY)."""
    bar = progress_bar(what)
    if bar is not None:
        return bar
    logger = get_run_logger()
    last = [-1]

    def cb(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // every > last[0] or done == total:
            last[0] = pct // every
            logger.info("%s: %d/%d (%d%%)", what, done, total, pct)

    return cb


def flow_options(name: str, kind: str, timeout_seconds: float) -> dict:
    """What every darkroom flow is declared with: its name, run names of ``kind`` (see
    run_name), prints as logs, and a timeout for the whole run."""
    return {
        "name": name,
        "flow_run_name": run_name(kind),
        "log_prints": True,
        "timeout_seconds": timeout_seconds,
    }


def run_name(kind: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<kind>-<what>-<UTC time>``, e.g.
    ``retrain-resnet18-5folds-6ep-20261123T020000Z`` or ``score-20261123T020000Z``. Names are
    safe as storage keys (the retrain flow names its quarantine report after its run)."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        parts = [kind]
        config = params.get("config")
        train = _field(config, "train")
        if kind == "retrain":
            from darkroom.config import TrainConfig

            t = (
                TrainConfig.model_validate(train or {})
                if not isinstance(train, TrainConfig)
                else train
            )
            parts += [
                t.backbone.replace("/", "_").replace(".", "_"),
                f"{t.folds}folds",
                f"{t.epochs}ep",
            ]
        if params.get("rescore") or _field(config, "rescore"):
            parts.append("rescore")
        return "-".join([*parts, f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"])

    return name


def _field(obj, name: str):
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


# ---- GPU slots: no more folds train at once than there are GPUs ------------------------------

GPU_LIMIT = "darkroom-gpu"  # the Prefect global concurrency limit: one slot per GPU


def visible_gpus(device: str = "auto") -> int:
    """How many GPUs a fold may be spread over: the visible CUDA devices when ``device`` is
    ``auto`` or ``cuda`` (an explicit ``cuda:1`` or ``cpu`` pins every fold: 0)."""
    if device not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ensure_gpu_limit(slots: int, name: str = GPU_LIMIT) -> bool:
    """Creates the global concurrency limit ``name`` with ``slots`` slots if it is missing.
    An existing limit is left as the operator set it (a cluster's total, say). Returns True
    when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=max(1, slots))
            )
        except ObjectAlreadyExists:
            return False  # another process won the race
        return True


@contextmanager
def gpu_slot(device: str = "auto", poll_seconds: float = 0.5, count: int = 1) -> Iterator[str]:
    """The device(s) one fold trains on. With GPUs (``auto``/``cuda``) in the thread pool:
    holds ``count`` slots of the ``darkroom-gpu`` global limit, then the locks of ``count``
    GPUs no other fold on this machine holds, and yields ``cuda:<i>`` (``cuda:<i>,<j>`` for a
    fold on several GPUs, ``devices_per_fold``). On a Ray worker, Ray has given the task its
    GPUs (the only ones CUDA shows it), and on a CPU: yields ``device`` unchanged.

    Raises:
        ValueError: ``count`` is more than the GPUs of this machine.
    """
    n = 0 if on_ray_worker() else visible_gpus(device)
    if n == 0:
        yield device
        return
    if count > n:
        raise ValueError(f"a fold on {count} GPUs (devices_per_fold) but this machine has {n}")
    from prefect.concurrency.sync import concurrency

    ensure_gpu_limit(n)
    with (
        concurrency(GPU_LIMIT, occupy=count, strict=True),
        _claim_gpus(n, count, poll_seconds) as ids,
    ):
        yield "cuda:" + ",".join(map(str, ids))


@contextmanager
def _claim_gpu(n: int, poll_seconds: float) -> Iterator[int]:
    """One GPU of ``n`` (see _claim_gpus)."""
    with _claim_gpus(n, 1, poll_seconds) as ids:
        yield ids[0]


@contextmanager
def _claim_gpus(n: int, count: int, poll_seconds: float) -> Iterator[list[int]]:
    """An exclusive lock file per GPU (by its UUID when torch knows it), so folds of any run on
    this machine never share a GPU: ``count`` of the ``n`` GPUs at once, or none held while
    waiting (two folds that each hold part of what they need would wait for ever)."""
    import time

    while True:
        held = _lock_free_gpus(n, count)
        if len(held) == count:
            try:
                yield [i for i, _ in held]
            finally:
                _unlock(held)
            return
        _unlock(held)
        time.sleep(poll_seconds)


def _lock_free_gpus(n: int, count: int) -> list:
    """(index, locked file) of up to ``count`` GPUs whose locks were free."""
    import fcntl
    import tempfile

    folder = Path(tempfile.gettempdir()) / "darkroom-gpu-locks"
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    for i in range(n):
        f = open(folder / f"{_gpu_name(i)}.lock", "w")  # noqa: SIM115  (held while training)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append((i, f))
        if len(held) == count:
            break
    return held


def _unlock(held: list) -> None:
    import fcntl

    for _, f in held:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _gpu_name(i: int) -> str:
    try:
        import torch

        return f"gpu-{torch.cuda.get_device_properties(i).uuid}"
    except Exception:  # no CUDA here (tests), or an old torch without uuid
        return f"gpu-{i}"


def on_ray_worker() -> bool:
    """True inside a Ray task (where Ray, not our locks, decides which GPU a task gets)."""
    ray = sys.modules.get("ray")
    return bool(
        ray and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    )
