"""benchmarks/bench_sync.py in its quick form: it measures what it says (the same objects
synced by every contender, one GET per object and no HEAD) and returns what `make bench`
reads. No timing is judged here: the ratios are the benchmark's to report."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import bench_sync

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_quick_benchmark_counts_one_get_per_object_and_returns_its_ratios():
    result = bench_sync.run(quick=True)
    d = result["details"]
    assert d["objects"] == 300 and d["object_bytes"] == 8192
    assert d["first_sync_requests_per_run"] == {"LIST": 1, "GET": 300}
    assert d["noop_sync_requests_per_run"] == {"LIST": 1}
    assert d["threads"] == d["pool_connections"] == 32
    assert all(len(v) == 3 for k, v in d["seconds"].items() if k != "aws_cli" or v)
    assert result["p4_noop_sync_vs_list"] > 0
    if shutil.which("aws"):
        assert result["p4_initial_sync_vs_aws_cli"] > 0 and d["aws_cli"].startswith("aws-cli/")
    else:
        assert result["p4_initial_sync_vs_aws_cli"] is None and "not installed" in d["aws_cli"]
