"""Prefect's temporary server for one ``darkroom`` command, started as the command starts.

With no PREFECT_API_URL, Prefect starts a temporary server (SQLite under PREFECT_HOME) the
first time a flow calls its API: after darkroom's imports, and after importing the server's
code into the command's own process just to start it (1.7 s on 2 cores). darkroom starts the
same server, with the command line Prefect uses, before its imports instead, so that the
server's start-up and the command's imports run side by side.

Whether a temporary server is wanted at all is Prefect's settings' call (a profile,
``prefect.toml`` or ``.env`` may name a server, or forbid temporary ones), known only once
Prefect is imported. ``confirm()`` asks them then; when they say anything else, the early
server is stopped and the command starts over without it, so Prefect does what it would have
done. ``DARKROOM_TEMPORARY_SERVER=0`` turns the early start off.

The server dies with the command, SIGKILL included (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from darkroom.ops import stopping

log = logging.getLogger(__name__)

SWITCH = "DARKROOM_TEMPORARY_SERVER"  # "0": leave the temporary server to Prefect
# What Prefect sets for its own temporary server (prefect.server.api.server.SubprocessASGIServer)
SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}

_server: subprocess.Popen | None = None
_url = ""


def command(port: int) -> list[str]:
    """Prefect's command line for its temporary server (the API only, no UI) on ``port``."""
    import importlib.util

    app_dir = os.path.dirname(os.path.dirname(importlib.util.find_spec("prefect").origin))
    return [
        sys.executable, "-m", "uvicorn", "--app-dir", app_dir,
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip


def start_early() -> None:
    """Starts the server and points PREFECT_API_URL at it, unless an API URL is set in the
    environment or the switch is off. Call before anything imports Prefect."""
    global _server, _url
    if os.environ.get("PREFECT_API_URL") or os.environ.get(SWITCH, "1") == "0":
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _server = subprocess.Popen(
        command(port),
        env={**os.environ, **SERVER_ENV},
        stdout=sys.stderr,  # the command's stdout is its result
        preexec_fn=stopping.die_with_parent,
    )
    atexit.register(stop)
    _url = os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"


def confirm(settings_without: Callable[[str], Any]) -> None:
    """Before the first flow: when Prefect's settings without the early server
    (``settings_without("PREFECT_API_URL")``, tasks.deployments', as the core does not import
    Prefect) name a server of their own or forbid temporary ones, stops the early server and
    runs the command again without it; else waits for the server to answer. A server that
    exited first (its port taken meanwhile, say) also makes the command start over, leaving
    the temporary server to Prefect.

    Raises:
        RuntimeError: the server did not answer within Prefect's start-up timeout.
    """
    if _server is None:
        return
    wanted = settings_without("PREFECT_API_URL")
    if wanted.api.url:
        _start_over(f"Prefect's settings name the server {wanted.api.url}")
    if not wanted.server.ephemeral.enabled:
        _start_over("Prefect's settings forbid temporary servers")
    _wait(wanted.server.ephemeral.startup_timeout_seconds)


def _start_over(why: str) -> None:
    """Runs the command again in this process, with the temporary server left to Prefect."""
    log.info("%s: starting over without darkroom's temporary server", why)
    stop(quiet=True)
    os.environ.pop("PREFECT_API_URL")
    os.environ[SWITCH] = "0"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "darkroom.cli", *sys.argv[1:]])


def _wait(timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _server.poll() is not None:
            _start_over(f"the temporary server exited with code {_server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{_url}/health", timeout=2).status_code == 200:
                log.info("Prefect's temporary server answers on %s", _url.removesuffix("/api"))
                return
        time.sleep(0.05)
    raise RuntimeError(
        f"Prefect's temporary server did not answer on {_url} within {timeout:.0f} s "
        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


def stop(quiet: bool = False) -> None:
    """Stops the early server (SIGTERM, then SIGKILL after 5 s); nothing when none runs."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = None
        return
    _server.terminate()
    try:
        _server.wait(5)
    except subprocess.TimeoutExpired:
        _server.kill()
        _server.wait()
    if not quiet:
        log.info("stopped Prefect's temporary server on %s", _url.removesuffix("/api"))
    _server = None
