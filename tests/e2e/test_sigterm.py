"""SIGTERM to `darkroom retrain` in the middle of a fold, as a worker cancelling a run or a
container being stopped sends it: the fold on the thread pool stops at its next batch (it used
to train on to its last epoch while the process waited), the flow is marked crashed, the
lease is released and Prefect's temporary server goes with the process (it used to be left
running). A fold stopped so is not marked finished: the next run resumes it."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.conftest import write_digits
from tests.e2e.service import left_in_session, session_processes
from tests.e2e.test_resume import REPO, _env, _retrain

pytestmark = pytest.mark.slow


def test_sigterm_stops_a_retrain_within_a_batch_and_leaves_nothing_running(local_storage, tmp_path):
    write_digits(local_storage, classes=("0", "1", "2"), per_class=24)
    proc = subprocess.Popen(
        _retrain(local_storage, tmp_path, "--checkpoint-every-seconds", "0", epochs=2000),
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: what it starts can be found afterwards
    )
    deadline = time.monotonic() + 240
    while not any(o.key.endswith("folds/0/checkpoint.pt") for o in local_storage.list("models/")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "fold 0 saved no checkpoint in time"
        time.sleep(0.1)
    assert local_storage.exists("leases/retrain.json")
    assert any("uvicorn" in c for c in session_processes(proc.pid)), "no temporary server to check"

    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # the CLI alone, not its process group
    _, err = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert stopped_in < 30, f"{stopped_in:.1f} s: the fold ran on"  # 2000 epochs: minutes
    assert "darkroom: stopped by SIGTERM" in err
    assert "Stopped: the run is stopping" in err  # the fold's own way out
    assert "Crashed" in err
    left = left_in_session(proc.pid)
    assert not left, f"still running after the CLI exited: {left}"
    assert not local_storage.exists("leases/retrain.json")
    folds = [o.key for o in local_storage.list("models/") if "/folds/" in o.key]
    assert any(k.endswith("folds/0/checkpoint.pt") for k in folds)
    assert not any(k.endswith("fold.json") for k in folds)  # nothing marked finished
