"""A fold past its timeout stops, on the thread pool's worker threads too.

Prefect delivers a task's timeout to a worker thread as an exception raised at the thread's
next Python step. A fold is a loop of short steps (batches, epochs, storage calls that have
their own timeouts), so the timeout stops it within a step: the task ends ``TimedOut`` and
the thread trains no further. Prefect's warning that timeouts in worker threads may wait
for a blocking call is therefore dropped for darkroom's tasks (tasks/common.py).
"""

from __future__ import annotations

import io
import logging
import time

import pytest
import torch
from prefect import flow

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data.index import rebuild_index
from darkroom.data.sync import sync_labeled
from darkroom.registry import pointer
from tasks.runners import task_runner
from tasks.train import train_fold
from tests.conftest import TINY, write_digits

pytestmark = pytest.mark.slow

SECONDS = 4


@flow
def one_task(task, config, calls: dict) -> object:
    """``task`` with a timeout of SECONDS and no retry, on darkroom's thread-pool runner."""
    with task_runner(config) as runner:
        future = runner.submit(task.with_options(timeout_seconds=SECONDS, retries=0), calls)
        return future.wait() or future.state


def _epoch(storage, key: str) -> int:
    saved = torch.load(io.BytesIO(storage.read_bytes(key)), map_location="cpu", weights_only=True)
    return saved["epoch"]


def test_a_fold_past_its_timeout_stops_in_its_worker_thread(local_storage, cache_dir, caplog):
    write_digits(local_storage, classes=("0", "1"), per_class=24)
    long = TINY.model_copy(update={"epochs": 10_000, "batch_size": 8})
    config = RetrainConfig(
        storage=local_storage.uri,
        cache_dir=str(cache_dir),
        device="cpu",
        train=long,
        checkpoint_every_seconds=0,  # a checkpoint per epoch: the fold's progress, on disk
    )
    sync_labeled(local_storage, config)
    snapshot = rebuild_index(local_storage, config, "test").snapshot
    version = pointer.new_version(snapshot, long.fingerprint())
    calls = {"config": config, "snapshot": snapshot, "version": version, "fold": 0}
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="prefect.task_runs"):
        state = one_task(train_fold, config, calls, return_state=True)
    elapsed = time.monotonic() - t0
    inner = state.result(raise_on_failure=False)
    assert inner.name == "TimedOut", inner
    assert elapsed < SECONDS + 30  # the timeout, the start-up, and one step to reach
    key = layout.fold(version, 0, "checkpoint.pt")
    epoch = _epoch(local_storage, key)
    assert 0 <= epoch < 10_000
    time.sleep(3)  # several epochs' time: a thread still training would have saved again
    assert _epoch(local_storage, key) == epoch
    assert not local_storage.exists(layout.fold(version, 0, "fold.json"))
    assert not [r for r in caplog.records if "worker thread" in r.getMessage()]
