"""Starts Prefect's temporary server while a CLI run is still importing torch and timm.

With no PREFECT_API_URL, Prefect starts a temporary server at the first API call and waits
for it (several seconds). Started here in a thread first, its boot (a subprocess) overlaps
the imports of the training and scoring code, and the flow finds it running.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable


def start_in_background() -> Callable[[], None]:
    """Starts the temporary server in a thread when Prefect would start one; returns a call
    that waits for it. The wait is bounded by Prefect's own start-up timeout
    (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); a failure is left for the flow's own
    first call to raise, with Prefect's message."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        # A failure is the flow's to report: its first API call starts the server again.
        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread.join
