"""benchmarks/bench_plan.py in its quick form: it plans what it lists (half of today's pairs
scored by the history, the rest in chunks) on both roots and returns what `make bench` reads.
No timing is judged here: the ratios are the benchmark's to report."""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_plan

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_quick_benchmark_plans_what_it_lists_and_returns_its_keys():
    result = bench_plan.run(quick=True)
    local_keys, moto_keys, rows = bench_plan.SIZES[True]
    for name, keys in (("local", local_keys), ("moto", moto_keys)):
        part = result["details"][name]
        assert part["incoming"] == keys and part["history_rows"] == rows
        assert part["already_scored"] == keys // 2  # older versions scored replaced images
        assert part["chunks"] == math.ceil((keys - keys // 2) / 512)
        assert part["history_over_empty"] > 0 and part["peak_rss_mib_history"] > 0
    assert result["details"]["local"]["first_plan_without_ledger_s"] > 0
    assert result["plan_time_with_history_over_empty"] == max(
        result["details"][n]["history_over_empty"] for n in ("local", "moto")
    )
    assert result["plan_peak_rss_mib"] > 0
