"""The thread-pool task runner under the test harness: submit_bounded keeps at most N runs
unfinished and plans lazily, and a scoring run never has more than max_chunks_in_flight chunks
running (the server's record of its task runs)."""

from __future__ import annotations

import threading

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from darkroom import layout
from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.registry import pointer
from darkroom.scoring import chunks as scoring
from darkroom.scoring.chunks import read_predictions
from darkroom.scoring.plan import StreamedPlan
from darkroom.storage import LocalStorage
from flows.score import score_new_images
from tasks.runners import submit_bounded, task_runner
from tests.conftest import TINY, train_candidate, write_digits

LIMIT = 3
_lock = threading.Lock()
_state = {"running": 0, "peak": 0}
_first = threading.Barrier(LIMIT, timeout=60)


@task(cache_policy=NO_CACHE)
def hold(i: int) -> int:
    with _lock:
        _state["running"] += 1
        _state["peak"] = max(_state["peak"], _state["running"])
    try:
        if i < LIMIT:  # the first LIMIT runs meet here: all of them were running at once
            _first.wait()
        return i
    finally:
        with _lock:
            _state["running"] -= 1


@flow
def fan_out(n: int) -> list[int]:
    finished: list[int] = []
    pulled = [0]

    def calls():
        for i in range(n):
            pulled[0] += 1
            # a call is taken only when fewer than LIMIT runs are unfinished
            assert pulled[0] - len(finished) <= LIMIT
            yield {"i": i}

    with task_runner(RetrainConfig()) as runner:
        for future in submit_bounded(runner, hold, calls(), LIMIT):
            finished.append(future.result())
    return finished


def test_submit_bounded_keeps_at_most_the_limit_unfinished_and_plans_lazily():
    assert sorted(fan_out(10)) == list(range(10))
    assert _state["peak"] == LIMIT and _state["running"] == 0


@pytest.mark.slow
def test_scoring_never_runs_more_chunks_than_max_chunks_in_flight(
    local_storage, cache_dir, monkeypatch
):
    write_digits(local_storage, classes=("0", "1"), per_class=8, incoming=6)
    version = train_candidate(local_storage, cache_dir, TINY)
    pointer.promote(local_storage, version, expected_etag=None, action="promote", reason="t")
    config = ScoreConfig(
        storage=local_storage.uri,
        cache_dir=str(cache_dir),
        device="cpu",
        chunk_size=1,
        max_chunks_in_flight=2,
    )
    # Chunks counted where they run: in this process, on the thread pool's threads.
    lock, running, peak = threading.Lock(), [0], [0]
    real = scoring.score_chunk

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(scoring, "score_chunk", counted)
    state = score_new_images(config, return_state=True)
    assert 1 <= peak[0] <= 2
    summary = state.result()
    assert summary["scored"] == 6 and summary["chunks"] == 6
    assert len(read_predictions(local_storage, version)) == 6


class CountingStorage(LocalStorage):
    """A local root that counts the incoming/ entries its listing has handed out."""

    listed = 0

    def list(self, prefix: str = ""):
        for obj in super().list(prefix):
            if prefix == layout.INCOMING:
                self.listed += 1
            yield obj


def test_the_plan_takes_the_listing_only_as_far_as_the_chunks_it_hands_out(tmp_path):
    storage = CountingStorage(tmp_path / "bucket")
    write_digits(storage, classes=("0",), per_class=1, incoming=10)
    storage.put_source_object("incoming/notes.txt", b"not an image")
    plan = StreamedPlan(storage, "v1", chunk_size=3, rescore=False)
    chunks = plan.chunks()
    first = next(chunks)
    assert len(first) == 3 and storage.listed == 3  # nothing listed beyond the first chunk
    rest = list(chunks)
    assert [len(c) for c in rest] == [3, 3, 1] and storage.listed == 11
    assert (plan.incoming, plan.already_scored, plan.to_score) == (10, 0, 10)
    keys = [k for c in [first, *rest] for k, _ in c]
    assert keys == sorted(keys) and len(set(keys)) == 10  # each pair in exactly one chunk
