"""Terminal progress (a bar with rate and ETA on a TTY, log lines in CI), the GPU slots that
keep folds one per GPU, and what folds and chunks ask of each task runner."""

from __future__ import annotations

import io
import threading
import time

import pytest

import tasks.gpus as gpus
import tasks.progress as progress
import tasks.runners as runners
from darkroom.config import RetrainConfig, ScoreConfig


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal_outside_ci(monkeypatch):
    monkeypatch.setattr(progress.sys, "stderr", Tty())
    monkeypatch.delenv("CI", raising=False)
    assert progress.interactive()
    for ci in ("true", "1", "yes"):
        monkeypatch.setenv("CI", ci)
        assert not progress.interactive() and progress.progress_bar("x") is None
    monkeypatch.setenv("CI", "false")
    assert progress.interactive()
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # piped: CI logs, workers
    assert not progress.interactive()


def test_the_bar_shows_count_rate_and_eta(monkeypatch):
    out = Tty()
    monkeypatch.setattr(progress.sys, "stderr", out)
    monkeypatch.delenv("CI", raising=False)
    cb = progress.log_progress("indexing images")  # what sync/index tasks get on a terminal
    assert isinstance(cb, progress.ProgressBar)
    for done in range(1, 51):
        cb(done, 50)
        time.sleep(0.002)
    text = out.getvalue()
    assert "indexing images" in text and "50/50" in text and "img/s" in text
    assert "<" in text  # elapsed<remaining: the ETA
    assert cb.bar.n == 50  # closed at 50/50: the next line starts clean


def test_epoch_bar_shows_metrics(monkeypatch):
    out = Tty()
    monkeypatch.setattr(progress.sys, "stderr", out)
    monkeypatch.delenv("CI", raising=False)
    bar = progress.progress_bar("fold 1/5", unit="epoch")
    bar(1, 3, val_acc="0.9000")
    bar.close()
    assert "fold 1/5" in out.getvalue() and "val_acc=0.9000" in out.getvalue()


def test_cpu_or_a_pinned_device_takes_no_gpu_slot():
    for device in ("cpu", "cuda:1"):
        with gpus.gpu_slot(device) as dev:
            assert dev == device
    if gpus.visible_gpus() == 0:
        with gpus.gpu_slot("auto") as dev:
            assert dev == "auto"


def test_each_concurrent_fold_gets_its_own_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))  # where the locks go
    holding: dict[int, int] = {}
    seen, lock = [], threading.Lock()
    peak = [0]

    def fold(k):
        with gpus._claim_gpu(2, poll_seconds=0.01) as gpu:
            with lock:
                assert gpu not in holding.values()  # never two folds on one GPU
                holding[k] = gpu
                peak[0] = max(peak[0], len(holding))
                seen.append(gpu)
            time.sleep(0.05)
            with lock:
                del holding[k]

    threads = [threading.Thread(target=fold, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 5 and set(seen) == {0, 1} and peak[0] == 2


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_visible_gpus_follows_torch(monkeypatch, device):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert gpus.visible_gpus(device) == 4
    assert gpus.visible_gpus("cpu") == 0


def test_on_a_ray_worker_a_fold_takes_neither_a_slot_nor_a_lock(monkeypatch):
    """Ray gave the task its GPU (CUDA_VISIBLE_DEVICES): no global limit, no lock files."""
    assert not gpus.on_ray_worker()  # this process is no Ray worker
    monkeypatch.setattr(gpus, "visible_gpus", lambda device="auto": 2)
    monkeypatch.setattr(gpus, "on_ray_worker", lambda: True)

    def no_limit(*a, **k):
        raise AssertionError("a Ray task must not touch the darkroom-gpu limit")

    monkeypatch.setattr(gpus, "ensure_gpu_limit", no_limit)
    with gpus.gpu_slot("auto") as dev:
        assert dev == "auto"


def test_folds_in_flight_from_config_gpus_or_one(monkeypatch):
    monkeypatch.setattr(runners, "visible_gpus", lambda device="auto": 0)
    assert runners.folds_in_flight(RetrainConfig()) == 1  # a CPU: one fold at a time
    monkeypatch.setattr(runners, "visible_gpus", lambda device="auto": 4)
    assert runners.folds_in_flight(RetrainConfig()) == 4
    assert runners.folds_in_flight(RetrainConfig(max_folds_in_flight=2)) == 2
    ray = RetrainConfig(task_runner="ray", train={"folds": 5})
    assert runners.folds_in_flight(ray) == 5  # Ray's scheduler holds each to its GPU


def test_chunks_in_flight_from_config_gpus_or_cores(monkeypatch):
    monkeypatch.setattr(runners, "visible_gpus", lambda device="auto": 0)
    monkeypatch.setattr(runners, "usable_cores", lambda: 6)  # a 6-CPU container
    assert runners.chunks_in_flight(ScoreConfig()) == 6
    monkeypatch.setattr(runners, "visible_gpus", lambda device="auto": 2)
    assert runners.chunks_in_flight(ScoreConfig()) == 2
    assert runners.chunks_in_flight(ScoreConfig(max_chunks_in_flight=3)) == 3
    monkeypatch.setattr(runners, "ray_cluster", lambda device: (0, 16))
    assert runners.chunks_in_flight(ScoreConfig(task_runner="ray")) == 16
    monkeypatch.setattr(runners, "ray_cluster", lambda device: (4, 16))
    assert runners.chunks_in_flight(ScoreConfig(task_runner="ray")) == 4


def test_what_folds_and_chunks_ask_of_ray(monkeypatch):
    monkeypatch.setattr(runners, "prefect_api_url", lambda: "http://prefect:4200/api")
    env = {"env_vars": {"PREFECT_API_URL": "http://prefect:4200/api"}}
    assert runners.fold_resources(RetrainConfig()) == {}  # threads: locks and the limit
    assert runners.chunk_resources(ScoreConfig(), 4) == {}
    monkeypatch.setattr(runners, "ray_cluster", lambda device: (2, 8))
    fold = RetrainConfig(task_runner="ray", train={"folds": 4})
    assert runners.fold_resources(fold) == {"num_gpus": 1, "runtime_env": env}
    chunk = ScoreConfig(task_runner="ray")
    assert runners.chunk_resources(chunk, 4) == {"num_gpus": 0.5, "runtime_env": env}
    assert runners.chunk_resources(chunk, 6)["num_gpus"] == pytest.approx(1 / 3)
    assert runners.chunk_resources(chunk, 1)["num_gpus"] == 1
    monkeypatch.setattr(runners, "ray_cluster", lambda device: (0, 8))  # no GPU in the cluster
    assert runners.fold_resources(fold) == {"num_cpus": 2, "runtime_env": env}
    assert runners.chunk_resources(chunk, 3) == {"num_cpus": 2, "runtime_env": env}
    assert runners.chunk_resources(chunk, 16)["num_cpus"] == 1


def test_ray_cluster_counts_gpus_only_for_a_device_that_uses_them(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert runners.ray_cluster("auto") == runners.ray_cluster("cuda") == (2, 8)
    assert runners.ray_cluster("cpu") == runners.ray_cluster("cuda:1") == (0, 8)
