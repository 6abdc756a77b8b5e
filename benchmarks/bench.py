"""`make bench`: darkroom's throughput ratios, each measured side by side in one run.

Every part is a module beside this one with ``run(quick: bool) -> dict`` that times darkroom's
path and its reference (the simple baseline, the model-only limit) in the same process, one
after the other, and returns the ratios under their ``p*`` keys plus a ``details`` dict. Each
part runs in a fresh Python process, so one part's threads, caches and memory never colour the
next. The results go to ``benchmarks/results/bench-<host>-<date>.json`` and a table is printed.

    python benchmarks/bench.py [--quick] [--only train,score] [--out FILE]

``--quick`` runs the same code paths on small inputs (minutes, not tens of minutes): for
checking that the benchmark works, not for quoting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARK = "@@bench-result@@ "
PART_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Target:
    key: str
    part: str
    op: str  # ">=" or "<="
    bound: float
    meaning: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value >= self.bound if self.op == ">=" else value <= self.bound


# The targets, on the 2-core CPU machine unless the part says otherwise.
TARGETS = [
    Target("p1_train_efficiency", "train", ">=", 0.9, "epoch img/s / synthetic step img/s"),
    Target("p1_vs_tutorial_loop", "train", ">=", 3.0, "epoch img/s / tutorials' loop img/s"),
    Target("p2_score_efficiency", "score", ">=", 0.85, "storage->Parquet img/s / model img/s"),
    Target("p2_drift_throughput_ratio", "score", ">=", 0.95, "img/s with drift flags / without"),
    Target("p3_cached_vs_decode", "train", ">=", 5.0, "cached item path / decode every epoch"),
    Target("p4_initial_sync_vs_aws_cli", "sync", ">=", 1.2, "aws s3 sync s / darkroom sync s"),
    Target("p4_noop_sync_vs_list", "sync", "<=", 1.2, "no-op resync s / bare listing s"),
    Target("p5_outside_epochs_share", "demo", "<=", 0.05, "demo retrain wall outside epochs"),
    Target("p6_rss_10k_over_1k", "train", "<=", 1.25, "peak RSS, 10k images / 1k images"),
    Target("plan_time_with_history_over_empty", "plan", "<=", 1.5, "plan s, 1M-row history / none"),
    Target("plan_peak_rss_mib", "plan", "<=", 1024, "peak RSS of a plan (MiB), 200k keys"),
]
PARTS = {
    "train": "bench_train",
    "score": "bench_score",
    "sync": "bench_sync",
    "demo": "bench_demo",
    "plan": "bench_plan",
}


def run_part(module: str, quick: bool, timeout: float = PART_TIMEOUT_S) -> dict:
    """``module.run(quick)`` in a fresh interpreter; its result, or why there is none."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module}; "
        f"print({MARK!r} + json.dumps({module}.run(quick={quick})), flush=True)"
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{module} ran past {timeout:.0f} s", "seconds": timeout}
    seconds = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {
            "error": f"{module} exited {proc.returncode}: " + " | ".join(tail),
            "seconds": seconds,
        }
    return {**json.loads(lines[-1][len(MARK) :]), "seconds": seconds}


def machine() -> dict:
    """Where the figures come from: absolute numbers only mean something with this."""
    facts = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        facts["device"] = "cpu"
    return facts


def commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def collect(parts: list[str], quick: bool) -> dict:
    """Runs ``parts`` one after another and gathers their ratios under the p* keys."""
    report: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": commit(),
        "quick": quick,
        "results": {},
        "targets": {},
        "parts": {},
    }
    for part in parts:
        print(f"[bench] {part} ...", flush=True)
        got = run_part(PARTS[part], quick)
        report["parts"][part] = got
        if "error" in got:
            print(f"[bench] {part} failed: {got['error']}", flush=True)
    for t in TARGETS:
        if t.part not in parts:
            continue
        value = report["parts"][t.part].get(t.key)
        report["results"][t.key] = value
        report["targets"][t.key] = {"want": f"{t.op} {t.bound}", "met": t.met(value)}
    return report


def table(report: dict) -> str:
    rows = [f"{'key':<34} {'value':>9}  {'target':<8} {'met':<5} meaning"]
    for t in TARGETS:
        if t.key not in report["results"]:
            continue
        value, met = report["results"][t.key], report["targets"][t.key]["met"]
        shown = "n/a" if value is None else f"{value:.3f}"
        flag = {True: "yes", False: "NO", None: "-"}[met]
        rows.append(f"{t.key:<34} {shown:>9}  {t.op} {t.bound:<5} {flag:<5} {t.meaning}")
    m = report["machine"]
    rows.append(f"machine: {m['host']}, {m['cpus']} cpus, device {m['device']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs: a check, not figures")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument(
        "--out", type=Path, help="result file (default: results/bench-<host>-<date>.json)"
    )
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    report = collect(parts, args.quick)
    name = f"bench-{report['machine']['host']}-{report['date'][:10]}.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(table(report))
    print(f"written: {out}")
    failed = [p for p, got in report["parts"].items() if "error" in got]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
