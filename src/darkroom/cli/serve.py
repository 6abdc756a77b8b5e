"""The supervisor behind `darkroom serve` and `make ui`: darkroom's deployments served from one
process, with the Prefect server they need.

Starts a local Prefect server on 127.0.0.1 with SQLite when none answers there (or uses the one
PREFECT_API_URL names), has ``tasks.deployments`` register and serve deployments/prefect.yaml
(the same schedules, triggers, parameters and concurrency limits that `prefect deploy`
registers), and prints the UI address. Ctrl-C or SIGTERM stops the runner and the server it
started; a server that dies stops darkroom serve, so that a supervisor restarts both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import httpx

from darkroom.cli.demo import DEMO_TRAIN
from darkroom.storage import default_storage_uri, open_storage
from tasks import deployments


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(port: int, log_path: Path, timeout: float = 120) -> subprocess.Popen:
    """``prefect server start`` on 127.0.0.1:<port> (SQLite under PREFECT_HOME) in its own
    process group, so a terminal's Ctrl-C reaches this process and not the server directly."""
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_API_URL": api_url,
    }
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115  (the server writes to it until it stops)
    proc = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not _healthy(api_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the Prefect server did not start on port {port}:\n{tail}")
        time.sleep(0.5)
    return proc


def stop_process_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _find_or_start_server(port: int) -> tuple[str, str, subprocess.Popen | None]:
    """(API URL, UI URL, the server process this call started or None): the server that
    PREFECT_API_URL names, one already answering on ``port``, or a new one there."""
    api_url, ui_url = deployments.configured_api_url()
    if api_url:
        print(f"using the Prefect server at {api_url} (PREFECT_API_URL)", flush=True)
        return api_url, ui_url or api_url.removesuffix("/api"), None
    api_url, ui_url = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    if _healthy(api_url):
        print(f"using the Prefect server already running at {ui_url}", flush=True)
        return api_url, ui_url, None
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    log_path = home / f"darkroom-server-{port}.log"
    print(f"starting a Prefect server on {ui_url} (SQLite in {home}, log {log_path})", flush=True)
    server = start_server(port, log_path)
    print(f"Prefect server started (pid {server.pid})", flush=True)
    return api_url, ui_url, server


def _stop_on_sigterm(signum, frame):
    # Containers, systemd and Kubernetes stop a service with SIGTERM: the same path as Ctrl-C.
    # (Prefect's runner installs its own handler once it runs: it pauses the deployments and
    # exits 0, which ends up in the same place.)
    raise KeyboardInterrupt


def _report_death(server: subprocess.Popen, died: threading.Event) -> None:
    if died.is_set():
        return
    died.set()
    print(
        f"the Prefect server (pid {server.pid}) exited with code {server.returncode}: "
        "stopping darkroom serve",
        flush=True,
    )


def _say_stopped(server: subprocess.Popen) -> None:
    # The last line a supervisor's log shows: the cause, after the runner's own errors.
    print(
        f"darkroom serve stopped: its Prefect server exited with code {server.returncode}",
        flush=True,
    )


def _watch_server(
    server: subprocess.Popen, died: threading.Event, stopping: threading.Event, grace: float = 20
) -> None:
    """Stops darkroom serve when the Prefect server it started dies, so that a supervisor
    restarts both: SIGTERM to this process, and a hard exit if that has not ended it. A server
    that serve itself is stopping (``stopping``) did not die."""
    while server.poll() is None:
        time.sleep(1)
    if stopping.is_set():
        return
    _report_death(server, died)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    _say_stopped(server)
    os._exit(1)


def serve(
    port: int = 4200,
    storage: str | None = None,
    cache_dir: str | None = None,
    timezone: str | None = None,
    watch_every: float | None = None,
    demo: bool = False,
) -> int:
    """Serves the deployments until Ctrl-C or SIGTERM; starts (and then stops) a server when
    none runs."""
    _prepare(storage, cache_dir)
    api_url, ui_url, server = _find_or_start_server(port)
    os.environ["PREFECT_API_URL"] = api_url
    died, stopping = threading.Event(), threading.Event()
    if server is not None:
        watch = threading.Thread(target=_watch_server, args=(server, died, stopping), daemon=True)
        watch.start()
    try:
        deployments.serve_deployments(
            api_url,
            ui_url,
            server is not None,
            timezone=timezone,
            watch_every=watch_every,
            demo_train=DEMO_TRAIN.model_dump(mode="json", exclude_defaults=True) if demo else None,
        )
    except (KeyboardInterrupt, SystemExit):
        pass
    except Exception:
        # The runner's own calls can fail before the watcher notices the server is gone: say
        # why, not only the runner's connection error.
        if server is None or server.poll() is None:
            raise
        traceback.print_exc()
    finally:
        _stop_server(server, died, stopping)
    if died.is_set():
        _say_stopped(server)
        return 1
    return 0


def _prepare(storage: str | None, cache_dir: str | None) -> None:
    """Signals, and the environment and folder the served flow runs start from."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Ctrl-C must stop us even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # Flow runs are subprocesses: they read the storage root and cache from the environment.
    os.environ["DARKROOM_STORAGE"] = open_storage(storage or default_storage_uri()).uri
    if cache_dir:
        os.environ["DARKROOM_CACHE"] = str(Path(cache_dir).expanduser().resolve())
    os.chdir(deployments.ROOT)  # prefect.yaml and the served flows' source paths resolve here


def _stop_server(
    server: subprocess.Popen | None, died: threading.Event, stopping: threading.Event
) -> None:
    """Stops the server this process started (unless it died: then says so)."""
    if server is not None and server.poll() is not None and not stopping.is_set():
        _report_death(server, died)
    stopping.set()
    if server is not None and not died.is_set():
        print("stopping the Prefect server", flush=True)
        stop_process_group(server)


if __name__ == "__main__":
    sys.exit(serve())
