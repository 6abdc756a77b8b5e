"""Terminal progress (a bar with rate and ETA on a TTY, log lines in CI) and the GPU slots
that keep folds one per GPU."""

from __future__ import annotations

import io
import threading
import time

import pytest

import tasks.common as common


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_bars_only_on_a_terminal_outside_ci(monkeypatch):
    monkeypatch.setattr(common.sys, "stderr", Tty())
    monkeypatch.delenv("CI", raising=False)
    assert common.interactive()
    for ci in ("true", "1", "yes"):
        monkeypatch.setenv("CI", ci)
        assert not common.interactive() and common.progress_bar("x") is None
    monkeypatch.setenv("CI", "false")
    assert common.interactive()
    monkeypatch.setattr(common.sys, "stderr", io.StringIO())  # piped: CI logs, workers
    assert not common.interactive()


def test_the_bar_shows_count_rate_and_eta(monkeypatch):
    out = Tty()
    monkeypatch.setattr(common.sys, "stderr", out)
    monkeypatch.delenv("CI", raising=False)
    cb = common.log_progress("indexing images")  # what sync/index tasks get on a terminal
    assert isinstance(cb, common.ProgressBar)
    for done in range(1, 51):
        cb(done, 50)
        time.sleep(0.002)
    text = out.getvalue()
    assert "indexing images" in text and "50/50" in text and "img/s" in text
    assert "<" in text  # elapsed<remaining: the ETA
    assert cb.bar.n == 50  # closed at 50/50: the next line starts clean


def test_epoch_bar_shows_metrics(monkeypatch):
    out = Tty()
    monkeypatch.setattr(common.sys, "stderr", out)
    monkeypatch.delenv("CI", raising=False)
    bar = common.progress_bar("fold 1/5", unit="epoch")
    bar(1, 3, val_acc="0.9000")
    bar.close()
    assert "fold 1/5" in out.getvalue() and "val_acc=0.9000" in out.getvalue()


def test_cpu_or_a_pinned_device_takes_no_gpu_slot():
    for device in ("cpu", "cuda:1"):
        with common.gpu_slot(device) as dev:
            assert dev == device
    if common.visible_gpus() == 0:
        with common.gpu_slot("auto") as dev:
            assert dev == "auto"


def test_each_concurrent_fold_gets_its_own_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))  # where the locks go
    holding: dict[int, int] = {}
    seen, lock = [], threading.Lock()
    peak = [0]

    def fold(k):
        with common._claim_gpu(2, poll_seconds=0.01) as gpu:
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
    assert common.visible_gpus(device) == 4
    assert common.visible_gpus("cpu") == 0
