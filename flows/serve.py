"""Serve darkroom's three deployments from one process: what `darkroom serve` and `make ui` run.

Reads deployments/prefect.yaml (the same schedules, triggers, parameters and concurrency limits
that `prefect deploy` registers), starts a local Prefect server on 127.0.0.1 with SQLite when
none answers there (or uses the one PREFECT_API_URL names), registers and serves the
deployments, and prints the UI address. Ctrl-C stops the runner and the server it started.
"""

from __future__ import annotations

import contextlib
import importlib
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def load_spec(path: Path = PREFECT_YAML) -> dict:
    """prefect.yaml as a dict (YAML anchors resolved)."""
    return yaml.safe_load(Path(path).read_text())


def load_flow(entrypoint: str):
    """The flow an entrypoint names: a module path (``flows.retrain.nightly_retrain``, what
    prefect.yaml uses) or a file relative to the checkout (``flows/retrain.py:nightly_retrain``,
    imported as the module ``flows.retrain`` all the same, so both give the same flow object)."""
    from prefect import Flow

    if ":" in entrypoint:
        path, func = entrypoint.rsplit(":", 1)
        module = path.removesuffix(".py").replace("/", ".")
    else:
        module, func = entrypoint.rsplit(".", 1)
    flow = getattr(importlib.import_module(module), func)
    if not isinstance(flow, Flow):
        raise TypeError(f"{entrypoint} is not a Prefect flow")
    return flow


def deployment_args(
    d: dict, *, timezone: str | None = None, watch_every: float | None = None, demo: bool = False
) -> dict:
    """Keyword arguments of ``Flow.to_deployment`` for one deployment of prefect.yaml."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.schedules import Cron, Interval
    from pydantic import TypeAdapter

    schedules = []
    for s in d.get("schedules") or []:
        tz = timezone or s.get("timezone")
        if "cron" in s:
            schedules.append(Cron(s["cron"], timezone=tz, active=s.get("active", True)))
        else:
            every = watch_every if watch_every and d["name"] == "watch-incoming" else s["interval"]
            schedules.append(Interval(every, timezone=tz, active=s.get("active", True)))
    triggers = []
    for i, t in enumerate(d.get("triggers") or []):
        t = {"name": f"{d['name']}__automation_{i + 1}", **t}
        triggers.append(TypeAdapter(DeploymentTriggerTypes).validate_python(t))
    limit = d.get("concurrency_limit")
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(**limit)
    parameters = dict(d.get("parameters") or {})
    if demo and d["name"] == "nightly-retrain":
        parameters["config"] = demo_retrain_config(parameters.get("config") or {})
    return {
        "name": d["name"],
        "description": d.get("description"),
        "tags": d.get("tags"),
        "schedules": schedules,
        "triggers": triggers,
        "concurrency_limit": limit,
        "parameters": parameters,
    }


def demo_retrain_config(config: dict) -> dict:
    """The demo's training (resnet18 from scratch at 32 px: minutes on a CPU, no download)."""
    from darkroom.demo import DEMO_TRAIN

    return {
        **config,
        "num_workers": 0,
        "train": DEMO_TRAIN.model_dump(mode="json", exclude_defaults=True),
    }


def build_deployments(spec: dict, **overrides) -> list:
    return [
        load_flow(d["entrypoint"]).to_deployment(**deployment_args(d, **overrides))
        for d in spec["deployments"]
    ]


def settings_without(variable: str):
    """Prefect's settings as they would be without the environment variable ``variable``: what
    the profile, ``prefect.toml`` and ``.env`` say (darkroom.tempserver asks)."""
    from prefect.settings import Settings

    saved = os.environ.pop(variable, None)
    try:
        return Settings()
    finally:
        if saved is not None:
            os.environ[variable] = saved


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
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    api_url = PREFECT_API_URL.value()
    if api_url:
        print(f"using the Prefect server at {api_url} (PREFECT_API_URL)", flush=True)
        return api_url, PREFECT_UI_URL.value() or api_url.removesuffix("/api"), None
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


def _serve_deployments(
    api_url: str, ui_url: str, server: subprocess.Popen | None, **overrides
) -> None:
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.common import ensure_gpu_limit, visible_gpus

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployments = build_deployments(load_spec(), **overrides)
        gpus = visible_gpus()
        if gpus and ensure_gpu_limit(gpus):
            print(f"created the global concurrency limit darkroom-gpu: {gpus} slots", flush=True)
        print(
            f"\nPrefect UI: {ui_url}\n  storage: {os.environ['DARKROOM_STORAGE']}\n"
            f"  run the nightly retrain now: PREFECT_API_URL={api_url} prefect deployment "
            "run nightly-retrain/nightly-retrain\n  Ctrl-C stops darkroom serve"
            + (" and the server it started" if server is not None else "")
            + "\n",
            flush=True,
        )
        prefect_serve(*deployments, print_starting_message=True)


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
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Ctrl-C must stop us even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    from darkroom.storage import default_storage_uri, open_storage

    # Flow runs are subprocesses: they read the storage root and cache from the environment.
    os.environ["DARKROOM_STORAGE"] = open_storage(storage or default_storage_uri()).uri
    if cache_dir:
        os.environ["DARKROOM_CACHE"] = str(Path(cache_dir).expanduser().resolve())
    os.chdir(ROOT)  # deployments/prefect.yaml and the served flows' source paths resolve here
    api_url, ui_url, server = _find_or_start_server(port)
    os.environ["PREFECT_API_URL"] = api_url
    died, stopping = threading.Event(), threading.Event()
    if server is not None:
        watch = threading.Thread(target=_watch_server, args=(server, died, stopping), daemon=True)
        watch.start()
    try:
        _serve_deployments(
            api_url, ui_url, server, timezone=timezone, watch_every=watch_every, demo=demo
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
        if server is not None and server.poll() is not None and not stopping.is_set():
            _report_death(server, died)
        stopping.set()
        if server is not None and not died.is_set():
            print("stopping the Prefect server", flush=True)
            stop_process_group(server)
    if died.is_set():
        _say_stopped(server)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve())
