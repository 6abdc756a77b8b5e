"""A fold on several processes (``devices_per_fold``): the config's check and the GPUs each
rank sees. The runs of real ranks are in tests/e2e/test_training_processes.py."""

from __future__ import annotations

import pytest
import torch

from darkroom.config import RetrainConfig
from darkroom.training import launch
from tests.conftest import TINY


def test_the_batch_must_split_evenly_over_the_devices():
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be a multiple of devices_per"):
        RetrainConfig(devices_per_fold=4, train=TINY.model_copy(update={"batch_size": 10}))
    assert RetrainConfig(devices_per_fold=4, train={"batch_size": 32}).devices_per_fold == 4


def test_the_ranks_see_the_gpus_the_fold_holds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    kind, env = launch._devices("cuda:1,3", 2)  # the 2nd and 4th GPU this process sees
    assert (kind, env["CUDA_VISIBLE_DEVICES"]) == ("cuda", "5,7")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch._devices("cuda:0,2", 2)[1]["CUDA_VISIBLE_DEVICES"] == "0,2"
    kind, env = launch._devices("cuda", 4)  # Ray showed this task its 4 GPUs: all of them
    assert kind == "cuda" and "CUDA_VISIBLE_DEVICES" not in env
    with pytest.raises(ValueError, match="devices_per_fold=2 needs 2 GPUs, but device is 'cuda:1'"):
        launch._devices("cuda:1", 2)
    with pytest.raises(ValueError, match="needs 8 GPUs"):
        launch._devices("cuda", 8)
    kind, env = launch._devices("cpu", 2)
    assert kind == "cpu" and int(env["OMP_NUM_THREADS"]) >= 1
