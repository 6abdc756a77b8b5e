"""GPU slots: no more folds train at once than there are GPUs (a Prefect global concurrency
limit, one slot per GPU), and which GPU each fold holds (lock files on the machine)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
