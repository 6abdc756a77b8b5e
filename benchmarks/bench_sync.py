"""Sync speed on one S3 endpoint: darkroom's first sync against ``aws s3 sync``, and its no-op
resync against a bare paginated listing (issue 11, p4).

A moto server (ThreadedMotoServer on 127.0.0.1, a free port) runs in a child process, as an S3
endpoint runs apart from its clients: in the benchmark's own process its request handling
would compete for the GIL with darkroom's threads and not with the aws CLI's process. It
holds N objects of 8 KB under ``labeled/`` (5,000; quick: 300). Each timing is the median of
3 runs, first syncs into fresh folders; all four are measured in the same run, on the same
endpoint, so their ratios hold even on a loaded machine. Requests are counted by HTTP method
as darkroom's boto3 clients send them.

    python benchmarks/bench_sync.py [--quick]
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

BUCKET = "darkroom-bench"
PREFIX = "labeled/"
OBJECT_BYTES = 8 * 1024
RUNS = 3
# Credentials for moto, and no config file of the developer's (a max_concurrent_requests set
# there would change what aws-cli is measured doing).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


# The child process: a moto server on a free port of 127.0.0.1 until its stdin closes.
MOTO_CHILD = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s %d" % server.get_host_and_port(), flush=True)
sys.stdin.read()
server.stop()
"""


@contextmanager
def moto_endpoint(code: str = MOTO_CHILD, *args: str):
    """The URL of a moto server running in a child process (a plain subprocess: it needs no
    import of the caller's main module, whatever script runs the benchmark). ``code`` prints
    "host port", then serves until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        host, port = proc.stdout.readline().split()
        yield f"http://{host}:{port}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def aws_env(endpoint: str):
    """AWS_* variables for moto in this process (boto3 reads them), restored afterwards."""
    values = {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in (*values, "AWS_PROFILE")}
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(n: int) -> None:
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    body = os.urandom(OBJECT_BYTES)

    def put(i: int) -> None:
        key = f"{PREFIX}c{i % 10}/img-{i:05d}.png"
        client.put_object(Bucket=BUCKET, Key=key, Body=body[i % 64 :] + body[: i % 64])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class RequestCounter:
    """Counts the HTTP requests a boto3 client sends: by method, and LIST for a GET of the
    bucket itself."""

    def __init__(self, client):
        self.counts: Counter[str] = Counter()
        client.meta.events.register("before-send.s3", self._count)

    def _count(self, request, **_) -> None:
        from urllib.parse import urlsplit

        bucket_only = urlsplit(request.url).path.strip("/").count("/") == 0
        self.counts["LIST" if request.method == "GET" and bucket_only else request.method] += 1

    def take(self, runs: int) -> dict[str, float]:
        out = {k: v / runs for k, v in self.counts.items()}
        self.counts.clear()
        return out


def aws_cli_sync(endpoint: str, n: int):
    """A function running ``aws s3 sync`` into a folder, and the CLI's version (or why not)."""
    aws = shutil.which("aws")
    if aws is None:
        return None, "aws CLI not installed (pip install awscli): not measured"
    env = {**os.environ, **AWS_ENV}
    env.pop("AWS_ENDPOINT_URL", None)  # named on the command line, as a user would

    def sync(dest: Path) -> None:
        cmd = [aws, "s3", "sync", f"s3://{BUCKET}/{PREFIX}", str(dest), "--endpoint-url"]
        subprocess.run([*cmd, endpoint, "--only-show-errors"], env=env, check=True)

    version = subprocess.run([aws, "--version"], capture_output=True, text=True, env=env)
    return sync, (version.stdout or version.stderr).strip()


def measure(endpoint: str, work: Path, n: int) -> dict:
    """Seconds of each run of the four, the aws CLI's and darkroom's first syncs taking turns
    (and then the no-op resync and the listing): a change in the machine's load hits both
    sides of a ratio alike."""
    import boto3

    from darkroom.data.fetch import default_threads
    from darkroom.data.sync import sync_prefix
    from darkroom.storage import open_storage

    storage = open_storage(f"s3://{BUCKET}")
    assert storage.for_threads(default_threads()) is storage  # the client counted is the one
    counter = RequestCounter(storage.client)
    aws, aws_cli = aws_cli_sync(endpoint, n)
    seconds = {"aws_cli": [], "first_sync": [], "noop_sync": [], "list": []}

    def first(cache: Path) -> None:
        report, _ = sync_prefix(storage, PREFIX, cache)
        assert report.new == n and report.failed == 0, report.summary()

    for i in range(RUNS):
        if aws:
            seconds["aws_cli"].append(timed(aws, work / f"aws-{i}"))
            got = sum(1 for p in (work / f"aws-{i}").rglob("*") if p.is_file())
            assert got == n, f"aws s3 sync fetched {got} of {n} objects"
        seconds["first_sync"].append(timed(first, work / f"darkroom-{i}"))
    first_requests = counter.take(RUNS)

    def noop() -> None:
        report, _ = sync_prefix(storage, PREFIX, work / "darkroom-0")
        assert report.unchanged == n, report.summary()

    client = boto3.client("s3")  # plain boto3, as anyone would list

    def listing() -> None:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX)
        assert sum(len(p.get("Contents", [])) for p in pages) == n

    for _ in range(RUNS):
        seconds["noop_sync"].append(timed(noop))
        seconds["list"].append(timed(listing))
    return {
        "seconds": seconds,
        "aws_cli": aws_cli,
        "first_sync_requests_per_run": first_requests,
        "noop_sync_requests_per_run": counter.take(RUNS),
        "threads": default_threads(),
        "pool_connections": storage.client.meta.config.max_pool_connections,
    }


def run(quick: bool = False) -> dict:
    """Measures the four timings side by side and returns the two ratios (aws-cli seconds /
    darkroom first-sync seconds; darkroom no-op seconds / listing seconds), each of medians,
    and details."""
    n = 300 if quick else 5000
    with moto_endpoint() as endpoint, aws_env(endpoint), tempfile.TemporaryDirectory() as tmp:
        upload(n)
        found = measure(endpoint, Path(tmp), n)
    median = {k: statistics.median(v) if v else None for k, v in found["seconds"].items()}
    aws, first = median["aws_cli"], median["first_sync"]
    return {
        "p4_initial_sync_vs_aws_cli": aws / first if aws else None,
        "p4_noop_sync_vs_list": median["noop_sync"] / median["list"],
        "details": {
            "objects": n,
            "object_bytes": OBJECT_BYTES,
            "runs_per_timing": RUNS,
            "aws_cli_first_sync_seconds": aws,
            "first_sync_seconds": first,
            "noop_sync_seconds": median["noop_sync"],
            "list_seconds": median["list"],
            **found,
            "moto": "ThreadedMotoServer on 127.0.0.1 in a child process",
            "cpus": os.cpu_count(),
        },
    }


def main() -> None:
    result = run(quick="--quick" in sys.argv)
    d = result["details"]
    aws = d["aws_cli_first_sync_seconds"]
    ratio = result["p4_initial_sync_vs_aws_cli"]
    rows = [
        (f"first sync, aws s3 sync ({d['objects']} x 8 KB)", aws),
        (f"first sync, darkroom ({d['threads']} threads)", d["first_sync_seconds"]),
        ("no-op resync, darkroom", d["noop_sync_seconds"]),
        ("bare paginated listing", d["list_seconds"]),
    ]
    for name, seconds in rows:
        print(f"{name:<48} {'n/a' if seconds is None else f'{seconds:8.2f} s'}")
    print(f"p4_initial_sync_vs_aws_cli {'n/a' if ratio is None else f'{ratio:.2f}'}")
    print(f"p4_noop_sync_vs_list       {result['p4_noop_sync_vs_list']:.2f}")
    print(f"darkroom requests per first sync: {d['first_sync_requests_per_run']}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
