"""Acceptance: hostile files on S3, through the real CLI, end to end.

One bucket on the moto server holds real digits and the battery of tests/hostile.py (a
900-megapixel PNG among them) under ``labeled/<class>/`` and again under ``incoming/``,
plus a labels.csv with a conflicting key and a key naming no object. ``darkroom retrain``
then ``darkroom score`` run once, each in its own process (Prefect's temporary server a
child of it); the tests read what they wrote back from S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pandas as pd
import pytest

from darkroom.data.index import read_index
from darkroom.scoring.chunks import read_predictions
from darkroom.storage import open_storage
from tests.conftest import LEARNS, train_flags, write_digits
from tests.hostile import BATTERY, LABELS_CSV, LIMIT, MISSING
from tests.s3.conftest import AWS_ENV, list_keys

pytestmark = [
    pytest.mark.s3,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc"),
]

REPO = Path(__file__).resolve().parents[2]
MAX_RSS = 2 << 30  # the acceptance bound for a retrain at 32 px
# The CLI's main in this process, then this process's peak RSS (VmHWM starts afresh at exec;
# ru_maxrss would carry the parent's over). Prefect's temporary server is a child: not counted.
MEASURED = """
import sys
from darkroom.cli.main import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(f"\\nPEAK_RSS {hwm}", file=sys.stderr)
sys.exit(code)
"""
TRAIN_FLAGS = train_flags(LEARNS)


def _vm_hwm(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone already
        return None
    return next(
        (int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM:")), None
    )


def _command(pid: int) -> str:
    try:
        return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:3])
    except OSError:
        return "?"


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _darkroom(args: list[str], env: dict, logs: Path) -> tuple[str, str, dict[str, int]]:
    """Runs ``darkroom <args>`` measured; returns stdout, stderr and the last VmHWM seen of
    each child process (sampled: a child's peak after the last sample is missed)."""
    out, err = logs / f"{args[0]}.out", logs / f"{args[0]}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-c", MEASURED, *args], cwd=REPO, env=env, stdout=o, stderr=e
        )
        children: dict[str, int] = {}  # "pid command" -> the last VmHWM read
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                if hwm := _vm_hwm(pid):  # None for a process gone, or one with no memory yet
                    name = f"{pid} {_command(pid)}"
                    children[name] = max(children.get(name, 0), hwm)
            time.sleep(0.2)
    stdout, stderr = out.read_text(), err.read_text()
    assert proc.returncode == 0, (
        f"darkroom {args[0]} exited {proc.returncode}\n{stdout}\n{stderr[-6000:]}"
    )
    return stdout, stderr, children


def _json_tail(stdout: str) -> dict:
    return json.loads(stdout[stdout.rfind("\n{") + 1 :])


@pytest.fixture(scope="module")
def run(moto_endpoint, tmp_path_factory):
    """The bucket after one retrain and one score; what they printed and measured."""
    tmp = tmp_path_factory.mktemp("hostile")
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "AWS_", "DARKROOM_"))
        },
        **AWS_ENV,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Prefect's 20 s for its temporary server to answer is short on a loaded 2-core CI box.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_HOME": str(tmp / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }
    bucket = f"darkroom-hostile-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, **_credentials())
    client.create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/root"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**AWS_ENV, "AWS_ENDPOINT_URL": moto_endpoint}.items():
            mp.setenv(k, v)
        storage = open_storage(uri)
        write_digits(storage, per_class=20, incoming=6)
        for case in BATTERY:  # put_object: darkroom itself refuses to write an unsafe key
            data = case.make()
            for where in ("labeled", "incoming"):
                client.put_object(Bucket=bucket, Key=f"root/{where}/{case.path}", Body=data)
        storage.write_text("labels.csv", LABELS_CSV)
        sources = {k: v["ETag"] for k, v in list_keys(client, bucket, "root/").items()}

        common = ["--storage", uri, "--cache-dir", str(tmp / "cache")]
        retrain = _darkroom(["retrain", *common, *TRAIN_FLAGS], env, tmp)
        score = _darkroom(["score", *common], env, tmp)
        summary = _json_tail(retrain[0])
        version = summary["version"]
        quarantine = [o.key for o in storage.list("reports/quarantine/")]
        yield {
            "storage": storage,
            "client": client,
            "bucket": bucket,
            "sources": sources,
            "retrain": summary,
            "retrain_rss": int(retrain[1].rsplit("PEAK_RSS ", 1)[1].split()[0]),
            "server_rss": retrain[2],
            "score": _json_tail(score[0]),
            "version": version,
            "index": read_index(storage).rows.set_index("key"),
            "quarantine_keys": quarantine,
            "quarantine": storage.read_parquet(quarantine[0]) if quarantine else None,
            "predictions": read_predictions(storage, version),
        }


def _credentials() -> dict:
    return {
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def test_a_900_megapixel_png_is_quarantined_rejected_and_costs_no_memory(run):
    """Acceptance: the retrain completes with the bomb under labeled/ and incoming/, the
    index quarantines it and scoring rejects it, both naming the limit, in under 2 GB."""
    rss, children = run["retrain_rss"], run["server_rss"]
    print(
        f"\nretrain peak RSS {rss / 2**20:.0f} MiB (limit {MAX_RSS / 2**20:.0f} MiB); "
        f"its child processes (Prefect's server), last VmHWM sampled: "
        f"{ {k: f'{v / 2**20:.0f} MiB' for k, v in children.items()} }"
    )
    assert run["retrain"]["skipped"] is False and run["retrain"]["promoted"] is True
    version = run["version"]
    assert run["storage"].exists(f"models/{version}/model.safetensors")
    assert len(run["quarantine_keys"]) == 1  # one retrain, one report

    bomb = run["quarantine"].set_index("key").loc["labeled/1/bomb.png"]
    assert bomb["status"] == "too_large" and LIMIT in bomb["error"]
    assert "900,000,000 pixels" in bomb["error"]
    assert (bomb["width"], bomb["height"], bomb["split"], bomb["fold"]) == (30000, 30000, "", -1)

    row = run["predictions"].set_index("key").loc["incoming/1/bomb.png"]
    assert row["status"] == "too_large" and LIMIT in row["error"]
    assert pd.isna(row["label"]) and row["model_version"] == version

    assert any("uvicorn" in k for k in children), f"no Prefect server among {list(children)}"
    assert 0 < rss < MAX_RSS


def test_every_hostile_file_is_used_or_quarantined_with_its_reason(run):
    index, report = run["index"], run["quarantine"].set_index("key")
    preds = run["predictions"]
    assert not preds["key"].duplicated().any()
    preds = preds.set_index("key")
    classes = set(index.loc[index["status"] == "ok", "label"])
    assert classes == {"0", "1", "2"}
    for case in BATTERY:
        key = f"labeled/{case.path}"
        if case.status == "ok":
            assert key in index.index, key
            assert (index.loc[key, "status"], index.loc[key, "label"]) == (
                "ok",
                case.expected_label,
            ), key
            assert key not in report.index, key
        else:
            assert key in report.index, f"{key}: not in the quarantine report"
            assert report.loc[key, "status"] == case.status, key
            assert case.reason in report.loc[key, "error"], (key, report.loc[key, "error"])
            if key in index.index:  # an unsafe key never becomes an index row
                assert index.loc[key, "status"] == case.status, key
        scored = preds.loc[f"incoming/{case.path}"]
        assert scored["status"] == case.score, (case.path, scored["error"])
        assert case.score_error in scored["error"], (case.path, scored["error"])
        if case.score == "ok":
            assert scored["label"] in classes and scored["error"] == "", case.path
        else:
            assert pd.isna(scored["label"]) and not len(scored["topk_labels"]), case.path
    for key, (status, reason) in MISSING.items():
        assert report.loc[key, "status"] == status and reason in report.loc[key, "error"]


def test_no_file_is_missing_from_both_and_sources_are_untouched(run):
    client, bucket = run["client"], run["bucket"]
    listed = {k.removeprefix("root/") for k in list_keys(client, bucket, "root/")}
    labeled = {k for k in listed if k.startswith("labeled/")}
    incoming = {k for k in listed if k.startswith("incoming/")}
    index, report = run["index"], run["quarantine"]
    ok = set(index.index[index["status"] == "ok"])
    quarantined = set(report["key"])
    assert labeled == ok | (quarantined - set(MISSING))  # unicode, '+', spaces: exact keys
    assert not ok & quarantined
    assert set(index.index[index["status"] != "ok"]) <= quarantined
    assert set(run["predictions"]["key"]) == incoming
    failed = sum(c.score != "ok" for c in BATTERY)
    assert (run["score"]["scored"], run["score"]["failed"]) == (len(incoming), failed)
    assert "labeled/2/ünïcødé ñame+1.png" in ok
    now = {k: v["ETag"] for k, v in list_keys(client, bucket, "root/").items()}
    assert {k: v for k, v in now.items() if k in run["sources"]} == run["sources"]
