"""The progress callback every long stage accepts: ``progress(done, total)`` (None: silent).

tasks/ turn it into a Prefect log line or a terminal bar; the core only calls it.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None] | None
