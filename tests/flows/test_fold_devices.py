"""A fold on several GPUs (``devices_per_fold``) takes that many of everything a fold holds: GPU
locks and ``darkroom-gpu`` slots in the thread pool, ``num_gpus`` on Ray."""

from __future__ import annotations

import threading
import time

import pytest

import tasks.gpus as slots
import tasks.runners as runners
from darkroom.config import RetrainConfig


def test_folds_on_two_gpus_each_never_share_one(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))  # where the locks go
    holding: dict[int, list[int]] = {}
    seen, lock, peak = [], threading.Lock(), [0]

    def fold(k):
        with slots._claim_gpus(5, 2, poll_seconds=0.01) as gpus:
            with lock:
                taken = [g for held in holding.values() for g in held]
                assert len(set(gpus)) == 2 and not set(gpus) & set(taken)
                holding[k] = gpus
                peak[0] = max(peak[0], len(holding))
                seen.append(tuple(gpus))
            time.sleep(0.05)
            with lock:
                del holding[k]

    threads = [threading.Thread(target=fold, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # 5 GPUs hold 2 folds of 2 at once; the fifth GPU alone never starts a fold
    assert len(seen) == 6 and peak[0] == 2


def test_a_fold_on_more_gpus_than_the_machine_has_is_refused(monkeypatch):
    monkeypatch.setattr(slots, "visible_gpus", lambda device="auto": 2)
    slot = slots.gpu_slot("auto", count=4)
    with pytest.raises(ValueError, match="a fold on 4 GPUs .* this machine has 2"), slot:
        pass


def test_a_fold_on_n_devices_asks_ray_for_n_gpus_and_threads_for_fewer_folds(monkeypatch):
    monkeypatch.setattr(runners, "prefect_api_url", lambda: "http://prefect:4200/api")
    monkeypatch.setattr(runners, "ray_cluster", lambda device: (8, 32))
    fold = RetrainConfig(task_runner="ray", devices_per_fold=4)
    assert runners.fold_resources(fold)["num_gpus"] == 4
    assert runners.fold_resources(RetrainConfig(task_runner="ray"))["num_gpus"] == 1
    monkeypatch.setattr(runners, "visible_gpus", lambda device="auto": 8)
    assert runners.folds_in_flight(RetrainConfig(devices_per_fold=4)) == 2
    assert runners.folds_in_flight(RetrainConfig(devices_per_fold=8)) == 1
    monkeypatch.setattr(runners, "visible_gpus", lambda device="auto": 0)
    assert runners.folds_in_flight(RetrainConfig(devices_per_fold=2)) == 1  # a CPU
