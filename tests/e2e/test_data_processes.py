"""Data and storage behaviour that needs a process of its own: peak memory of decoding huge
images (measured in a fresh interpreter) and the storage lease against dead and live processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from darkroom.storage import lease
from tests.conftest import plant_lease
from tests.e2e.test_cli import darkroom, one_line_error


def peak_rss(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# Peak RSS in bytes from VmHWM, which starts afresh at exec; ru_maxrss would not: Linux carries
# it over from the pre-exec image, here the whole pytest process.
RSS = """
import json
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
"""
linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM")


@linux_only
def test_describing_a_huge_png_keeps_memory_small(huge):
    code = (
        RSS
        + f"""
from darkroom.data.rows import describe_image
before = rss()
row = describe_image({str(huge)!r})
print(json.dumps({{"before": before, "after": rss(), "status": row["status"]}}))
"""
    )
    out = peak_rss(code)
    print(f"peak RSS describing the 900 MP PNG: {out}")
    assert out["status"] == "too_large"
    assert out["after"] < 1 << 30  # imports (torch...) included
    assert out["after"] - out["before"] < 64 << 20  # decoding it would take 900 MB


@linux_only
def test_a_100_megapixel_jpeg_costs_little_memory(tmp_path):
    path = tmp_path / "100mp.jpg"
    Image.new("L", (12000, 8400), 128).save(path, "JPEG", quality=80)
    code = (
        RSS
        + f"""
from darkroom.data.images import read_rgb
before = rss()
shape = read_rgb({str(path)!r}, min_side=224).shape
print(json.dumps({{"before": before, "after": rss(), "shape": shape}}))
"""
    )
    out = peak_rss(code)
    print(f"peak RSS decoding the 100 MP JPEG at reduced scale: {out}")
    assert out["shape"] == [1050, 1500, 3]
    assert out["after"] - out["before"] < 64 << 20  # full scale: 300 MB of RGB


def test_a_lease_left_by_a_killed_run_here_is_taken_over_at_once(local_storage):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant_lease(local_storage, "retrain", socket.gethostname(), dead.pid, seconds=3600)
    taken = lease.acquire(local_storage, "retrain", ttl=60)
    assert (
        local_storage.read_json("leases/retrain.json")["holder"]["pid"]
        == taken.record["holder"]["pid"]
    )


def test_the_cli_stops_with_the_holder_named(local_storage):
    from tests.conftest import write_digits

    write_digits(local_storage, per_class=5)
    plant_lease(local_storage, "retrain", "nightly-box", 4242, seconds=3600)
    run = darkroom("retrain", "--storage", local_storage.uri, "--no-pretrained")
    one_line_error(run, "another retrain run holds", "nightly-box pid 4242")
    plant_lease(local_storage, "score", "scorer", 7, seconds=3600)
    one_line_error(darkroom("score", "--storage", local_storage.uri), "scorer pid 7")
    assert json.loads((local_storage.root / "leases" / "retrain.json").read_text())
