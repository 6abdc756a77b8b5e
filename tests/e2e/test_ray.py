"""The flows on Ray through prefect-ray: a local Ray instance with two fake GPUs (Ray schedules
by them and sets CUDA_VISIBLE_DEVICES; CPU-only torch then trains on the CPU), the flows'
task runs reported to a real Prefect server."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest
import ray
import torch
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness
from ray.util.state import list_tasks

from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.registry import pointer
from darkroom.scoring.chunks import read_predictions
from darkroom.storage import LocalStorage
from flows.retrain import nightly_retrain
from flows.score import score_new_images
from tests.conftest import LEARNS, finished_task_runs, write_digits

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api():
    """A real Prefect server (a subprocess); this process's flows use it, and the flows tell
    their Ray workers to (nothing in the workers' environment does)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def fake_gpu_ray(api):
    with pytest.MonkeyPatch.context() as env:
        env.delenv("PREFECT_API_URL", raising=False)  # the workers must get it from the flow
        ray.init(num_cpus=2, num_gpus=2, dashboard_port=_free_port())  # dashboard: state API
    yield
    ray.shutdown()


def _flow_run_id(api: str, flow_name: str) -> str:
    runs = (
        httpx.post(
            f"{api}/flow_runs/filter",
            json={"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC"},
        )
        .raise_for_status()
        .json()
    )
    return runs[0]["id"]


def _numbers(result: dict) -> dict[str, float]:
    """The CV and holdout metrics of a retrain's result, flattened: ``cv.accuracy.mean``..."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, int | float):
            out[prefix] = float(value)

    walk("cv", result["cv"])
    walk("holdout", result["holdout"])
    return out


def _ray_tasks(name: str, count: int) -> list:
    """Ray's record of the finished tasks named ``name`` (task events reach the state API a
    moment after the tasks end)."""
    deadline = time.monotonic() + 60
    while True:
        tasks = list_tasks(filters=[("name", "=", name)], detail=True, limit=1000)
        done = [t for t in tasks if t.state == "FINISHED"]
        if len(done) >= count or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def test_folds_and_chunks_run_on_ray_with_the_thread_runners_result(api, fake_gpu_ray, tmp_path):
    roots = {}
    for runner in ("threads", "ray"):  # the same images in two roots
        roots[runner] = LocalStorage(tmp_path / runner)
        write_digits(roots[runner], classes=("0", "1", "2"), per_class=16, incoming=4)
    # The same arithmetic on both sides: Ray runs a one-CPU task with one torch thread, and
    # another thread count sums in another order (the models would drift apart in float).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {
            runner: nightly_retrain(
                RetrainConfig(
                    storage=roots[runner].uri,
                    cache_dir=str(tmp_path / f"cache-{runner}"),
                    task_runner=runner,
                    train=LEARNS,
                )
            )
            for runner in ("threads", "ray")  # Ray's run last: the newest run below
        }
    finally:
        torch.set_num_threads(threads_before)
    on_ray, threads = results["ray"], results["threads"]
    assert on_ray["version"] == threads["version"] and not on_ray["skipped"]
    assert on_ray["promoted"] == threads["promoted"]
    ray_metrics, thread_metrics = _numbers(on_ray), _numbers(threads)
    assert ray_metrics.keys() == thread_metrics.keys() and len(ray_metrics) >= 6
    assert ray_metrics == pytest.approx(thread_metrics, abs=1e-6)

    # The folds were Ray tasks, each on one of the two (fake) GPUs, in worker processes.
    folds = _ray_tasks("train_fold", 2)
    assert len(folds) == 2
    assert all(t.required_resources.get("GPU") == 1.0 for t in folds)
    assert os.getpid() not in {t.worker_pid for t in folds}
    # ... and they trained at the same time: each started before the other ended (the
    # server's record of the retrain's task runs).
    runs = finished_task_runs(api, _flow_run_id(api, "nightly-retrain"), "train-fold-", 2)
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    first, second = runs
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"]

    if not on_ray["promoted"]:  # the gate's call on a tiny holdout; scoring needs a champion
        pointer.promote(
            roots["ray"], on_ray["version"], expected_etag=None, action="promote", reason="test"
        )
    scored = score_new_images(
        ScoreConfig(
            storage=roots["ray"].uri,
            cache_dir=str(tmp_path / "cache-ray"),
            task_runner="ray",
            chunk_size=2,
            max_chunks_in_flight=4,
        )
    )
    assert scored["scored"] == 4 and scored["chunks"] == 2 and scored["failed"] == 0
    assert len(read_predictions(roots["ray"], on_ray["version"])) == 4
    chunks = _ray_tasks("score_chunk", 2)
    assert len(chunks) == 2 and os.getpid() not in {t.worker_pid for t in chunks}
    # Up to four chunks in flight on two GPUs: half a GPU each.
    assert all(t.required_resources.get("GPU") == 0.5 for t in chunks)
    runs = finished_task_runs(api, _flow_run_id(api, "score-new-images"), "score-chunk-", 2)
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
