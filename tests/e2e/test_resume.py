"""Kill and resume: `darkroom retrain` in a subprocess, SIGKILLed in the middle of a fold, then
rerun. The fold continues from its last epoch checkpoint, finished folds are not retrained, and
an unchanged rerun trains nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import train_flags, write_digits

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _retrain(storage, tmp_path, *extra: str, epochs: int = 12) -> list[str]:
    return [
        sys.executable,
        "-m",
        "darkroom.cli",
        "retrain",
        "--storage",
        storage.uri,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        *train_flags(epochs=epochs, batch_size=8),
        *extra,
    ]


def _env(tmp_path) -> dict:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DARKROOM_CACHE": str(tmp_path / "dc"),
    }
    env.pop("PREFECT_API_URL", None)  # each run on its own temporary local server
    return env


def _run(cmd, tmp_path) -> dict:
    done = subprocess.run(
        cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its temporary Prefect server
    proc.wait()


def _version(storage) -> str:
    return next(
        o.key.split("/")[1] for o in storage.list("models/") if o.key.endswith("folds/0/fold.json")
    )


def test_killed_run_resumes_and_an_unchanged_rerun_trains_nothing(local_storage, tmp_path):
    write_digits(local_storage, classes=("0", "1", "2"), per_class=24)
    fold1 = []

    def fold1_checkpointed() -> bool:
        if not fold1:
            fold1.extend(
                o.key
                for o in local_storage.list("models/")
                if o.key.endswith("folds/1/checkpoint.pt")
            )
        return bool(fold1)

    proc = subprocess.Popen(
        # a checkpoint after every epoch, so that one exists mid-fold to kill the run at
        _retrain(local_storage, tmp_path, "--checkpoint-every-seconds", "0"),
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _kill_when(proc, fold1_checkpointed)

    version = _version(local_storage)
    key = f"models/{version}/folds/"
    assert not local_storage.exists(key + "1/fold.json"), "fold 1 finished before the kill"
    saved = torch.load(
        io.BytesIO(local_storage.read_bytes(key + "1/checkpoint.pt")), weights_only=True
    )
    assert not saved["final"] and "optimizer" in saved  # mid-fold: the whole resume state
    fold0 = local_storage.read_bytes(key + "0/fold.json")

    out = _run(_retrain(local_storage, tmp_path), tmp_path)
    assert out["version"] == version and not out["skipped"] and out["promoted"]
    assert json.loads(local_storage.read_text("models/champion.json"))["version"] == version
    assert local_storage.read_bytes(key + "0/fold.json") == fold0  # not retrained
    record = json.loads(local_storage.read_text(key + "1/fold.json"))
    assert record["resumed_from_epoch"] == saved["epoch"] + 1 >= 1
    assert [h["epoch"] for h in record["history"]] == list(range(12))
    assert not list(local_storage.list(key + "1/checkpoint"))  # dropped once the fold is done

    again = _run(_retrain(local_storage, tmp_path), tmp_path)
    assert again["skipped"] and again["version"] == version

    changed = _run(
        _retrain(local_storage, tmp_path, "--label-smoothing", "0.1", epochs=2), tmp_path
    )
    assert not changed["skipped"] and changed["version"] != version
    assert local_storage.exists(f"models/{changed['version']}/folds/1/fold.json")


def test_non_finite_loss_fails_the_run_and_promotes_nothing(local_storage, tmp_path):
    write_digits(local_storage, classes=("0", "1"), per_class=16)
    cmd = _retrain(local_storage, tmp_path, epochs=3)
    cmd[cmd.index("--lr") + 1], cmd[cmd.index("--lr-min") + 1] = "1e30", "1e29"
    cmd[cmd.index("--batch-size") + 1] = "4"
    done = subprocess.run(
        cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "NonFiniteLoss" in done.stderr and "lower the lr" in done.stderr
    assert not local_storage.exists("models/champion.json")
    assert not [o.key for o in local_storage.list("models/") if o.key.endswith("fold.json")]
