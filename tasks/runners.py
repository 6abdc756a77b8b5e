"""Where folds and scoring chunks run: Prefect's thread pool on this machine, or a Ray cluster
through prefect-ray, chosen per run by ``config.task_runner``. A flow's own task runner is fixed
where the flow is declared, so a flow enters ``task_runner(config)`` around the work it fans out
and submits through ``submit_bounded``, which keeps at most a set number of runs unfinished."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prefect import Task
from prefect.futures import PrefectFuture, as_completed

from darkroom.ops import stopping
from darkroom.ops.cores import usable_cores
from tasks.gpus import visible_gpus

if TYPE_CHECKING:
    from prefect.task_runners import TaskRunner

    from darkroom.config import RetrainConfig, RuntimeConfig, ScoreConfig

C = TypeVar("C", bound="RuntimeConfig")
CUDA_DEVICES = ("auto", "cuda")  # devices that may use whatever GPU the task is given


def task_runner(config: RuntimeConfig) -> TaskRunner:
    """A new, unstarted task runner for ``config.task_runner``; a flow enters it around the
    work it fans out (a flow's own runner is fixed where it is declared).

    Raises:
        ValueError: ``ray`` without prefect-ray installed.
    """
    if config.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ValueError(
            'task_runner=ray needs prefect-ray and ray: pip install "darkroom[ray]" (or use '
            "task_runner=threads)"
        ) from None
    return RayTaskRunner(address=config.ray_address)


@contextlib.contextmanager
def running(config: RuntimeConfig) -> Iterator[TaskRunner]:
    """``task_runner(config)``, entered, with a stop scope inside it (darkroom.ops.stopping): a
    flow that leaves the block with an error (SIGTERM, a cancelled run, a task that failed for
    good) stops the folds or chunks still running at their next batch, before the runner
    waits for its threads."""
    with task_runner(config) as runner, stopping.scope():
        yield runner


def for_workers(config: C) -> C:
    """``config`` with its storage root spelled out (an empty one is $DARKROOM_STORAGE here,
    a relative path is this folder's), so every worker reads the flow's own root."""
    from darkroom.storage import open_storage

    return config.model_copy(update={"storage": open_storage(config.storage).uri})


def ray_cluster(device: str) -> tuple[int, int]:
    """(GPUs, CPUs) of the Ray cluster a started RayTaskRunner is connected to; GPUs count
    only for a device that may use them."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0)) if device in CUDA_DEVICES else 0
    return gpus, int(total.get("CPU", 1))


def folds_in_flight(config: RetrainConfig) -> int:
    """How many folds train at once: ``max_folds_in_flight``, else every fold on Ray (its
    scheduler holds each to its GPUs) and one per ``devices_per_fold`` visible GPUs (at least
    1) in threads."""
    if config.max_folds_in_flight:
        return config.max_folds_in_flight
    if config.task_runner == "ray":
        return config.train.folds
    return max(1, visible_gpus(config.device) // config.devices_per_fold)


def chunks_in_flight(config: ScoreConfig) -> int:
    """How many scoring chunks run at once: ``max_chunks_in_flight``, else one per GPU, else
    one per CPU core (Ray: the cluster's; threads: this machine's, or its container's limit)."""
    if config.max_chunks_in_flight:
        return config.max_chunks_in_flight
    if config.task_runner == "ray":
        gpus, cpus = ray_cluster(config.device)
    else:
        gpus, cpus = visible_gpus(config.device), usable_cores()
    return max(1, gpus or cpus)


def fold_resources(config: RetrainConfig) -> dict:
    """What a fold asks Ray for: ``devices_per_fold`` GPUs (one unless a fold trains on
    several), or where the cluster has none (or the device is the CPU) its share of the CPUs.
    Nothing in threads (GPU locks and the global limit there)."""
    if config.task_runner != "ray":
        return {}
    gpus, cpus = ray_cluster(config.device)
    if gpus:
        return ray_options(num_gpus=config.devices_per_fold)
    return ray_options(num_cpus=max(1, cpus // folds_in_flight(config)))


def chunk_resources(config: ScoreConfig, in_flight: int) -> dict:
    """What a scoring chunk asks Ray for: its share of a GPU (1/n when n chunks in flight
    share each GPU), else its share of the CPUs. Nothing in threads."""
    if config.task_runner != "ray":
        return {}
    gpus, cpus = ray_cluster(config.device)
    if gpus:
        return ray_options(num_gpus=1 / math.ceil(in_flight / gpus))
    return ray_options(num_cpus=max(1, cpus // in_flight))


def ray_options(**resources) -> dict:
    """``ray.remote`` options of a task: its resources, and the Prefect API this flow run
    uses, which its worker reports to (without it every worker would start a temporary
    server of its own); it must be reachable from every node."""
    return {**resources, "runtime_env": {"env_vars": {"PREFECT_API_URL": prefect_api_url()}}}


def prefect_api_url() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def submit_bounded(
    runner: TaskRunner,
    task: Task,
    calls: Iterable[dict],
    limit: int,
    resources: dict | None = None,
) -> Iterator[PrefectFuture]:
    """Submits ``task`` to ``runner`` once per parameter dict of ``calls``, never more than
    ``limit`` unfinished at once: the next call is taken from ``calls`` (a lazy iterable, so
    planning keeps pace) only when a run finishes. Yields each future once it has finished,
    in the order they finish. On Ray, each run asks for ``resources`` (``remote_options``)."""
    running: set[PrefectFuture] = set()
    calls = iter(calls)
    while True:
        if len(running) >= limit:  # wait for room before planning the next call
            done = next(as_completed(list(running)))
            running.remove(done)
            yield done
        parameters = next(calls, None)
        if parameters is None:
            break
        running.add(_submit(runner, task, parameters, resources))
    yield from as_completed(list(running))


def _submit(runner: TaskRunner, task: Task, parameters: dict, resources: dict | None):
    if not resources:
        return runner.submit(task, parameters)
    from prefect_ray.context import remote_options

    with remote_options(**resources):
        return runner.submit(task, parameters)
