"""Planning a scoring run at scale: does its cost follow the new images or the history?

Lists 200,000 incoming keys on a local root and 50,000 on moto (an S3 server on 127.0.0.1 in a
child process), and plans a scoring run (``darkroom.scoring.StreamedPlan``, every chunk drawn
as the flow draws them) with no prediction history and with a history of 1,000,000 prediction
rows. Each plan runs in a fresh process, which reports its planning seconds and its peak RSS
(VmHWM); the runs alternate empty / history, three times each (medians), so their ratio holds
on a loaded machine. The history is written through darkroom's own writers
(``predictions_table`` + ``write_predictions``, which adds the ledger parts), in files of
5,000 rows: four older versions scored every key under an etag it no longer has (the images
were replaced), the newest scored half of today's pairs, and the rest are keys since removed.
One plan merges the parts before the timed runs (``first_plan_merges_s``); the local root also
times a plan from predictions alone, as an earlier darkroom left them
(``first_plan_without_ledger_s``). Incoming objects are empty: planning reads listings only.

    python benchmarks/bench_plan.py [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sync import aws_env, moto_endpoint  # noqa: E402

RUNS = 3
ROWS_PER_FILE = 5_000
SIZES = {False: (200_000, 50_000, 1_000_000), True: (3_000, 1_000, 20_000)}
BUCKET = "darkroom-plan"

# One plan in a fresh interpreter: its seconds and peak RSS (VmHWM: ru_maxrss would carry
# the parent's peak across exec), as JSON on the last line.
CHILD = """
import json, sys, time
from darkroom.scoring.plan import StreamedPlan
from darkroom.storage import open_storage
def hwm():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) / 1024
storage = open_storage(sys.argv[1])
before = hwm()
t0 = time.perf_counter()
plan = StreamedPlan(storage, "v4", 512)
chunks = sum(1 for _ in plan.chunks())
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mib": hwm(), "rss_before_mib": before,
                  "incoming": plan.incoming, "already_scored": plan.already_scored,
                  "chunks": chunks}))
"""

# moto's server in a child process, its bucket seeded through moto's own backend (an HTTP PUT
# per object would take minutes for 100,000 objects); everything measured goes over HTTP.
MOTO_SEEDED = """
import logging, sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
bucket, keys = sys.argv[1], int(sys.argv[2])
backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
backend.create_bucket(bucket, "us-east-1")
for root in ("empty", "history"):
    for i in range(keys):
        backend.put_object(bucket, f"{root}/incoming/d{i // 1000:04d}/img{i:07d}.jpg", b"")
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s %d" % server.get_host_and_port(), flush=True)
sys.stdin.read()
server.stop()
"""


def seeded_moto(keys: int):
    """A moto server holding ``keys`` empty incoming objects under each root: its URL."""
    return moto_endpoint(MOTO_SEEDED, BUCKET, str(keys))


def plan_in_child(uri: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, uri], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"planning {uri} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def history_files(listed: list[tuple[str, str]], rows: int):
    """(version, pairs) of each history file: ``rows`` prediction rows in all."""
    n = len(listed)
    old = min(4, max(0, (rows - n // 2) // n))
    out = [(f"v{v}", [(k, f"old{v}-{e}") for k, e in listed]) for v in range(old)]
    out.append(("v4", listed[: n // 2]))
    gone = rows - old * n - n // 2
    out.append(("v4", [(f"incoming/gone/{i:07d}.jpg", "e") for i in range(gone)]))
    for version, pairs in out:
        for i in range(0, len(pairs), ROWS_PER_FILE):
            yield version, pairs[i : i + ROWS_PER_FILE]


def write_history(storage, listed, rows: int, threads: int = 1) -> float:
    """Writes the history through darkroom's writers; returns the seconds it took."""
    import numpy as np

    from darkroom.config import ScoreConfig
    from darkroom.scoring import chunks as scoring
    from darkroom.scoring import plan as planning

    def write(item) -> None:
        version, pairs = item
        probs = np.full((len(pairs), 2), 0.5, np.float32)
        ok = np.ones(len(pairs), bool)
        table = scoring.predictions_table(version, ["a", "b"], pairs, probs, ok, {}, ScoreConfig())
        scoring.write_predictions(storage, version, planning.chunk_id(pairs), table)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, history_files(listed, rows)))
    return time.perf_counter() - t0


def listed(storage) -> tuple[list[tuple[str, str]], float]:
    """The incoming (key, etag) pairs and the seconds a bare listing took."""
    from darkroom.data.names import is_image_key

    t0 = time.perf_counter()
    pairs = [(o.key, o.etag) for o in storage.list("incoming/") if is_image_key(o.key)]
    return pairs, time.perf_counter() - t0


def compare(empty_uri: str, history_uri: str, storage, keys: int, rows: int) -> dict:
    """Writes the history under ``history_uri``, then times plans of both roots in turn."""
    from darkroom.scoring import ledger

    pairs, listing_s = listed(storage)
    assert len(pairs) == keys, f"listed {len(pairs)} of {keys} incoming keys"
    written_s = write_history(storage, pairs, rows, threads=1 if storage.uri[:4] == "file" else 8)
    t0 = time.perf_counter()
    scored = ledger.scored(storage)  # the first plan after a run merges the ledger parts
    merge_s = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {"empty": [], "history": []}
    for _ in range(RUNS):
        for name, uri in (("empty", empty_uri), ("history", history_uri)):
            runs[name].append(plan_in_child(uri))
    empty_s = statistics.median(r["seconds"] for r in runs["empty"])
    history_s = statistics.median(r["seconds"] for r in runs["history"])
    last = runs["history"][-1]
    return {
        "incoming": keys,
        "history_rows": len(scored),
        "listing_s": round(listing_s, 3),
        "plan_empty_s": round(empty_s, 3),
        "plan_history_s": round(history_s, 3),
        "history_over_empty": round(history_s / empty_s, 3),
        "peak_rss_mib_empty": round(max(r["peak_rss_mib"] for r in runs["empty"]), 1),
        "peak_rss_mib_history": round(max(r["peak_rss_mib"] for r in runs["history"]), 1),
        "rss_after_imports_mib": round(last["rss_before_mib"], 1),
        "already_scored": last["already_scored"],
        "chunks": last["chunks"],
        "history_written_s": round(written_s, 1),
        "first_plan_merges_s": round(merge_s, 3),
    }


def local_part(keys: int, rows: int, work: Path) -> dict:
    from darkroom import layout
    from darkroom.storage import LocalStorage

    roots = [work / "empty", work / "history"]
    for root in roots:
        for i in range(keys):
            folder = root / "incoming" / f"d{i // 1000:04d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True)
            (folder / f"img{i:07d}.jpg").touch()
    storage = LocalStorage(roots[1])
    out = compare(roots[0].as_uri(), roots[1].as_uri(), storage, keys, rows)
    shutil.rmtree(roots[1] / layout.LEDGER)  # as an earlier darkroom left the root
    out["first_plan_without_ledger_s"] = round(plan_in_child(roots[1].as_uri())["seconds"], 3)
    return out


def moto_part(keys: int, rows: int) -> dict:
    from darkroom.storage import open_storage

    t0 = time.perf_counter()
    with seeded_moto(keys) as endpoint, aws_env(endpoint):
        seeded_s = time.perf_counter() - t0
        uris = [f"s3://{BUCKET}/empty", f"s3://{BUCKET}/history"]
        out = compare(*uris, open_storage(uris[1]), keys, rows)
        return {**out, "server_seeded_s": round(seeded_s, 1)}


def run(quick: bool = False) -> dict:
    """Planning seconds with a 1,000,000-row history over with none (local and moto: the
    larger ratio) and the peak RSS of any plan."""
    local_keys, moto_keys, rows = SIZES[quick]
    work = Path(tempfile.mkdtemp(prefix="darkroom-bench-plan-"))
    try:
        local = local_part(local_keys, rows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    moto = moto_part(moto_keys, rows)
    parts = {"local": local, "moto": moto}
    return {
        "plan_time_with_history_over_empty": max(p["history_over_empty"] for p in parts.values()),
        "plan_peak_rss_mib": max(
            max(p["peak_rss_mib_empty"], p["peak_rss_mib_history"]) for p in parts.values()
        ),
        "details": {**parts, "quick": quick, "runs": RUNS, "cpus": os.cpu_count()},
    }


def table(result: dict) -> str:
    rows = [
        f"{'':<8} {'keys':>8} {'history':>9} {'empty s':>8} {'hist s':>8} {'ratio':>6} {'RSS MiB':>8}"
    ]
    for name in ("local", "moto"):
        p = result["details"][name]
        rows.append(
            f"{name:<8} {p['incoming']:>8} {p['history_rows']:>9} {p['plan_empty_s']:>8.2f} "
            f"{p['plan_history_s']:>8.2f} {p['history_over_empty']:>6.2f} "
            f"{p['peak_rss_mib_history']:>8.0f}"
        )
    rows.append(
        f"plan_time_with_history_over_empty {result['plan_time_with_history_over_empty']:.3f} "
        f"(target <= 1.5); plan_peak_rss_mib {result['plan_peak_rss_mib']:.0f} (target < 1024)"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    got = run(quick="--quick" in sys.argv[1:])
    print(table(got))
    print(json.dumps(got, indent=2))
