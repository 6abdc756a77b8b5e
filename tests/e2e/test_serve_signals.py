"""darkroom serve as a service: SIGTERM stops it like Ctrl-C (exit 0, its server stopped), and
when the Prefect server it started dies, it exits non-zero at once so a supervisor restarts it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

import pytest

from tests.e2e.service import Service

pytestmark = pytest.mark.slow


@pytest.fixture
def served(tmp_path):
    service = Service(tmp_path).start()
    yield service
    service.kill()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_serve_and_the_server_it_started(served):
    assert _listening(served.port)
    t0 = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.tail()
    print(f"darkroom serve exited {time.monotonic() - t0:.1f}s after SIGTERM")
    deadline = time.monotonic() + 30
    while _listening(served.port):
        assert time.monotonic() < deadline, "the Prefect server still listens after SIGTERM"
        time.sleep(0.5)


def test_serve_exits_non_zero_when_its_server_dies(served):
    assert served.server_pid
    t0 = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(served.server_pid, signal.SIGKILL)
    code = served.proc.wait(60)
    print(f"darkroom serve exited with {code} {time.monotonic() - t0:.1f}s after its server died")
    assert code != 0, served.tail()
    # The runner's own connection errors may come first; the cause is the log's last line.
    last = served.log.read_text(errors="replace").strip().splitlines()[-1]
    assert last.startswith("darkroom serve stopped: its Prefect server exited with code"), (
        served.tail()
    )
