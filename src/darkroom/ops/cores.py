"""The cores this process may use: its CPU affinity, capped by its container's CPU limit.

Light on purpose (the standard library only): the CLI's start-up and the flows' planning read
it without importing torch or OpenCV.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU limit of this process's container in cores (a Kubernetes ``limits.cpu``, a
    ``docker run --cpus``), from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when
    there is none."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity (the machine's cores where the OS has
    none), capped by its container's CPU limit. A pod limited to 4 CPUs on a 64-core node
    counts 4, not 64."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores
