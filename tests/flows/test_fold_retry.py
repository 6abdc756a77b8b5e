"""A fold is a retried task: storage that fails once (a full disk as the fold writes its
weights) costs the fold one more attempt, not the run, and the retried fold's weights are the
ones a clean run trains."""

from __future__ import annotations

import errno

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

import tasks.train
from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.storage import LocalStorage
from flows.retrain import nightly_retrain
from tests.conftest import TINY, train_candidate, write_digits

pytestmark = pytest.mark.slow


def test_a_fold_that_fails_once_is_retried_and_trains_the_clean_runs_weights(tmp_path, monkeypatch):
    clean, faulty = LocalStorage(tmp_path / "clean"), LocalStorage(tmp_path / "faulty")
    for storage in (clean, faulty):
        write_digits(storage, classes=("0", "1", "2"), per_class=12)
    clean_version = train_candidate(clean, tmp_path / "clean-cache", TINY)

    failed = []
    real_put = LocalStorage._put

    def disk_full_once(self, key, data, if_match, if_none_match):
        if key.endswith("folds/0/model.safetensors") and not failed:
            failed.append(key)
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return real_put(self, key, data, if_match, if_none_match)

    monkeypatch.setattr(LocalStorage, "_put", disk_full_once)
    monkeypatch.setattr(tasks.train.train_fold, "retry_delay_seconds", 0)
    config = RetrainConfig(
        storage=faulty.uri, cache_dir=str(tmp_path / "cache"), device="cpu", train=TINY
    )
    state = nightly_retrain(config, return_state=True)
    assert failed and state.is_completed(), state
    version = state.result()["version"]

    api = PREFECT_API_URL.value()
    runs = httpx.post(
        f"{api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [str(state.state_details.flow_run_id)]}}},
    ).json()
    attempts = {r["name"]: r["run_count"] for r in runs if r["name"].startswith("train-fold-")}
    assert attempts == {"train-fold-0": 2, "train-fold-1": 1}
    fold0 = next(r for r in runs if r["name"] == "train-fold-0")
    states = httpx.get(f"{api}/task_run_states/", params={"task_run_id": fold0["id"]}).json()
    names = [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]
    assert names == ["Pending", "Running", "Retrying", "Completed"]

    for fold in range(TINY.folds):
        key = layout.fold(version, fold, "model.safetensors")
        clean_key = layout.fold(clean_version, fold, "model.safetensors")
        assert faulty.read_bytes(key) == clean.read_bytes(clean_key), f"fold {fold}"
