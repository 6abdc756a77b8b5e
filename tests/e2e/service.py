"""`darkroom serve` for tests: on a free port of 127.0.0.1 it starts its own Prefect server
(SQLite in a temporary PREFECT_HOME) and serves the three deployments. One per session, shared
by the end-to-end and browser tests; everything it started is killed at the end, even after a
failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from darkroom.storage import LocalStorage
from tests.conftest import write_digits

ROOT = Path(__file__).resolve().parents[2]
TINY_RETRAIN = {
    "num_workers": 0,
    "train": {
        "backbone": "test_resnet",
        "pretrained": False,
        "image_size": 32,
        "batch_size": 4,
        "epochs": 5,
        "lr": 0.002,
        "lr_min": 0.00001,
        "folds": 2,
        "augment": "none",
    },
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def session_processes(sid: int) -> list[str]:
    """The command lines of the processes in session ``sid`` (a process started with
    ``start_new_session=True`` leads the session of its own pid, its children join it)."""
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == sid:
                    left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
    return left


def left_in_session(sid: int, timeout: float = 15) -> list[str]:
    """``session_processes(sid)`` once it is empty, or what is still there after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.ui = f"http://127.0.0.1:{self.port}"
        self.storage = LocalStorage(tmp / "bucket")
        self.log = tmp / "serve.log"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_API_", "PREFECT_UI_", "PREFECT_PROFILE"))
        }
        self.env.update(
            PREFECT_HOME=str(tmp / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            # The tests start runs by hand; a scheduled run (hourly scoring, the watcher)
            # arriving in the middle of one would make them flaky. test_workers.py checks the
            # scheduler on a server of its own.
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
            DARKROOM_CACHE=str(tmp / "cache"),
            PYTHONUNBUFFERED="1",
        )
        self.proc: subprocess.Popen | None = None
        self.server_pid: int | None = None
        self.retrain_run: dict | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 150) -> Service:
        # The watcher's schedule is long: the tests run it by hand.
        cmd = [
            sys.executable,
            "-m",
            "darkroom.cli",
            "serve",
            "--port",
            str(self.port),
            "--storage",
            self.storage.uri,
            "--watch-every",
            "3600",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if m := re.search(r"Prefect server started \(pid (\d+)\)", text):
                self.server_pid = int(m.group(1))
            if "being served" in text:
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"darkroom serve did not start:\n{self.tail()}")

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C: SIGINT to darkroom serve only; returns its exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Whatever is left, process groups and all (serve, its flow runs, the server)."""
        for pid in filter(None, [self.proc and self.proc.pid, self.server_pid]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    # ---- the API --------------------------------------------------------------------------

    def post(self, path: str, body: dict) -> list | dict:
        return httpx.post(f"{self.api}{path}", json=body, timeout=30).raise_for_status().json()

    def get(self, path: str) -> dict:
        return httpx.get(f"{self.api}{path}", timeout=30).raise_for_status().json()

    def prefect(self, *args: str, timeout: float = 120, check: bool = True):
        """The prefect CLI against this server (what an operator types)."""
        prefect = str(Path(sys.executable).with_name("prefect"))
        env = {**self.env, "PREFECT_API_URL": self.api}
        out = subprocess.run(
            [prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        if not check:
            return out
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def run_deployment(self, name: str, params: dict | None = None) -> str:
        args = ["deployment", "run", name]
        if params:
            args += ["--params", json.dumps(params)]
        out = self.prefect(*args)
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def wait_run(self, run_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state_type"] in TERMINAL:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} did not finish:\n{self.tail()}")

    def flow_runs(self, flow_name: str, scheduled: bool = False) -> list[dict]:
        """The flow's runs that started (or, with ``scheduled``, those the server's scheduler
        created ahead of their cron/interval time, which have not)."""
        runs = self.post(
            "/flow_runs/filter",
            {
                "flows": {"name": {"any_": [flow_name]}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 100,
            },
        )
        return [r for r in runs if (r["state_type"] == "SCHEDULED") == scheduled]

    def retrained(self) -> dict:
        """Once per session: digits under labeled/, then a manual run of the nightly-retrain
        deployment from the CLI (`prefect deployment run`) with a tiny config."""
        if self.retrain_run is None:
            write_digits(self.storage, classes=("0", "1", "2"), per_class=24)
            run_id = self.run_deployment(
                "nightly-retrain/nightly-retrain", {"config": TINY_RETRAIN}
            )
            run = self.wait_run(run_id)
            assert run["state_type"] == "COMPLETED", self.tail()
            self.retrain_run = run
        return self.retrain_run


_SERVICE: Service | None = None


def shared_service(request, tmp_path_factory) -> Service:
    """The session's running service (started on first use, killed at the session's end)."""
    global _SERVICE
    if _SERVICE is None or _SERVICE.proc.poll() is not None:
        _SERVICE = Service(tmp_path_factory.mktemp("service")).start()
        request.config.add_cleanup(_SERVICE.kill)
    return _SERVICE
