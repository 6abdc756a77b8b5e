"""Exactly-once scoring, end to end through the real CLI in a subprocess: a run killed
half-way and rerun, and a promotion in the middle of a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from darkroom.registry import pointer
from darkroom.scoring.chunks import read_predictions
from tests.conftest import TINY, train_candidate, write_digits
from tests.e2e.service import left_in_session

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
INCOMING = 80


def _train(storage, cache, seed: int) -> str:
    return train_candidate(storage, cache, TINY.model_copy(update={"seed": seed}))


@pytest.fixture
def scored_root(local_storage, cache_dir):
    write_digits(local_storage, classes=("0", "1", "2"), per_class=15, incoming=INCOMING)
    first = _train(local_storage, cache_dir, seed=1)
    pointer.promote(local_storage, first, expected_etag=None, action="promote", reason="test")
    second = _train(local_storage, cache_dir, seed=2)
    return local_storage, cache_dir, first, second


def _score(storage, cache, tmp_path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    # One image per chunk: many small tasks, so the run is still going when we interfere.
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "darkroom.cli",
            "score",
            "--storage",
            storage.uri,
            "--cache-dir",
            str(cache),
            "--chunk-size",
            "1",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_files(storage, version, n: int, proc, timeout=120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = len(list(storage.list(f"predictions/{version}/")))
        if found >= n:
            return found
        if proc.poll() is not None:
            pytest.fail(f"scoring ended before {n} chunks: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.05)
    pytest.fail("scoring wrote no chunk in time")


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_scoring_run_rerun_scores_each_image_exactly_once(scored_root, tmp_path, how):
    storage, cache, champion, _ = scored_root
    proc = _score(storage, cache, tmp_path)
    _wait_for_files(storage, champion, 5, proc)
    if how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its temporary server
        proc.wait()
    else:  # the CLI alone, as a container stop or a worker's cancel sends it
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, out.decode()[-3000:]
        assert not left_in_session(proc.pid)  # its temporary server went with it
        assert not storage.exists("leases/score.json")  # released on the way out
    partial = len(list(storage.list(f"predictions/{champion}/")))
    assert 5 <= partial < INCOMING, "the run must have died half-way for this test to mean much"
    # nothing half-written: every file present is a complete Parquet file
    assert len(read_predictions(storage, champion)) == partial

    _finish(_score(storage, cache, tmp_path))
    preds = read_predictions(storage, champion)
    incoming = {o.key: o.etag for o in storage.list("incoming/")}
    assert len(incoming) == INCOMING
    assert not preds.duplicated(["key", "etag", "model_version"]).any()
    assert dict(zip(preds["key"], preds["etag"], strict=True)) == incoming
    # the folder reads as one dataset
    assert len(pd.read_parquet(storage.root / "predictions" / champion)) == INCOMING


def test_a_promotion_during_a_run_does_not_change_its_version(scored_root, tmp_path):
    storage, cache, champion, challenger = scored_root
    proc = _score(storage, cache, tmp_path)
    _wait_for_files(storage, champion, 3, proc)
    _, etag = pointer.read_champion(storage)
    pointer.promote(
        storage,
        challenger,
        expected_etag=etag,
        action="manual-promote",
        reason="promoted mid-run",
        previous=champion,
    )
    out = _finish(proc)
    preds = read_predictions(storage, champion)
    assert len(preds) == INCOMING and set(preds["model_version"]) == {champion}
    assert not list(storage.list(f"predictions/{challenger}/")), out[-2000:]
    # the next run uses the new champion, for new images only unless asked to rescore
    assert pointer.read_champion(storage)[0].version == challenger
