"""darkroom.cli.tempserver: a `darkroom` command with no PREFECT_API_URL starts Prefect's temporary
server as it starts (beside its imports, not after them), with Prefect's own command line; the
server records the runs and goes with the command, SIGKILL included. Prefect's settings still
decide: a profile that names a server gets its runs there, with no temporary server."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from darkroom.cli import tempserver
from darkroom.cli.serve import start_server, stop_process_group
from tests.e2e.service import free_port, left_in_session, session_processes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, **extra: str) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", tempserver.SWITCH):
        env.pop(name, None)
    return {**env, **extra}


def _score(root: Path, env: dict, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "darkroom.cli", "score", "--storage", root.as_uri()]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_the_command_line_is_prefects_own(monkeypatch):
    """Drift guard: Prefect's SubprocessASGIServer, asked to start, runs what darkroom runs."""
    import prefect.server.api.server as server

    seen = {}

    def popen(args, env=None, **kw):
        seen.update(args=args, env=env)
        raise RuntimeError("captured")

    monkeypatch.setattr(server.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match="captured"):
        server.SubprocessASGIServer(port=free_port()).start(timeout=1)
    port = seen["args"][seen["args"].index("--port") + 1]
    assert seen["args"] == tempserver.command(int(port))
    assert tempserver.SERVER_ENV.items() <= seen["env"].items()


def test_a_command_runs_on_its_temporary_server_which_goes_with_it(tmp_path):
    root, home = tmp_path / "bucket", tmp_path / "prefect"
    root.mkdir()
    proc = _score(root, _env(home), start_new_session=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "no champion" in err, err[-3000:]  # the flow ran, and failed
    assert "temporary server answers on http://127.0.0.1:" in err
    assert "stopped Prefect's temporary server" in err
    assert "Starting temporary server" not in err  # Prefect did not start a second one
    assert not left_in_session(proc.pid)
    with sqlite3.connect(home / "prefect.db") as db:
        names = [n for (n,) in db.execute("select name from flow_run")]
    assert len(names) == 1 and names[0].startswith("score-")


def test_a_sigkilled_command_takes_its_temporary_server_with_it(tmp_path):
    root = tmp_path / "bucket"
    root.mkdir()
    proc = _score(root, _env(tmp_path / "prefect"), start_new_session=True)
    deadline = time.monotonic() + 60
    while not any("uvicorn" in c for c in session_processes(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the command alone: no handler, no atexit
    proc.communicate(timeout=30)
    assert not left_in_session(proc.pid), "the temporary server outlived its command"


def test_a_profile_that_names_a_server_gets_the_runs_there(tmp_path, monkeypatch):
    home, port = tmp_path / "prefect", free_port()
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "server"))  # the server's own database
    server = start_server(port, tmp_path / "server.log")
    try:
        api = f"http://127.0.0.1:{port}/api"
        home.mkdir(exist_ok=True)
        (home / "profiles.toml").write_text(
            f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{api}"\n'
        )
        root = tmp_path / "bucket"
        root.mkdir()
        proc = _score(root, _env(home))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "no champion" in err, err[-3000:]
        assert f"Prefect's settings name the server {api}: starting over" in err
        assert "answers on" not in err and "Starting temporary server" not in err
        runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 10}, timeout=10).json()
        assert [r["name"][:6] for r in runs] == ["score-"]
    finally:
        stop_process_group(server)


def test_a_profile_that_forbids_temporary_servers_gets_prefects_own_answer(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "strict"\n\n[profiles.strict]\nPREFECT_SERVER_ALLOW_EPHEMERAL_MODE = "false"\n'
    )
    root = tmp_path / "bucket"
    root.mkdir()
    proc = _score(root, _env(home), start_new_session=True)
    _, err = proc.communicate(timeout=120)
    assert "Prefect's settings forbid temporary servers: starting over" in err, err[-3000:]
    assert proc.returncode == 1
    (line,) = [ln for ln in err.splitlines() if ln.startswith("darkroom: error:")]
    assert "PREFECT_API_URL" in line  # Prefect's own refusal, as without darkroom's server
    assert not left_in_session(proc.pid)
