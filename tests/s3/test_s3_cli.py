"""Acceptance: `darkroom retrain` and `darkroom score` against s3:// on a moto server give the
same kinds of outputs as on a local folder. The real console script runs in subprocesses,
each flow run on its own temporary Prefect server (PREFECT_HOME in tmp_path)."""

from __future__ import annotations

import io
import json
import subprocess

import pyarrow.parquet as pq
import pytest

from darkroom.scoring.chunks import PREDICTION_SCHEMA
from tests.conftest import PREDICTION_COLUMNS, cli_env, run_darkroom, train_flags
from tests.s3.conftest import list_keys

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _json_tail(stdout: str) -> dict:
    """The JSON object the command printed last (logs may precede it)."""
    return json.loads(stdout[stdout.rfind("\n{") + 1 :])


def test_retrain_score_status_on_s3(s3_env, tmp_path):
    client, bucket, prefix = s3_env["client"], s3_env["bucket"], "demo"
    storage = f"s3://{bucket}/{prefix}"
    cache = tmp_path / "cache"
    env = cli_env(tmp_path, **s3_env["env"])

    def darkroom(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return run_darkroom(*args, env=env, timeout=timeout)

    def objects(sub: str = "") -> dict[str, dict]:
        return {
            k[len(prefix) + 1 :]: v for k, v in list_keys(client, bucket, f"{prefix}/{sub}").items()
        }

    def body(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    darkroom("demo-data", "--storage", storage, "--limit", "300")
    labeled = objects("labeled/")
    incoming = objects("incoming/")
    assert len(labeled) + len(incoming) == 300
    assert incoming and len(labeled) > len(incoming)
    sources_before = {k: v["ETag"] for k, v in {**labeled, **incoming}.items()}

    retrain = darkroom(
        "retrain",
        "--storage",
        storage,
        "--cache-dir",
        str(cache),
        *train_flags(),  # LEARNS: 5 epochs clear the gate's majority-class baseline
    )
    summary = _json_tail(retrain.stdout)
    assert summary["skipped"] is False
    assert summary["promoted"] is True
    assert summary["sync"]["new"] == len(labeled)

    champion = json.loads(body("models/champion.json"))
    version = champion["version"]
    assert version == summary["version"]
    model_files = set(objects(f"models/{version}/"))
    for name in ("model.safetensors", "model.json", "metrics.json", "oof.parquet"):
        assert f"models/{version}/{name}" in model_files
    meta = json.loads(body(f"models/{version}/model.json"))
    assert meta["backbone"] == "test_resnet"
    assert meta["classes"] == [str(d) for d in range(10)]
    metrics = json.loads(body(f"models/{version}/metrics.json"))
    assert len(metrics["folds"]) == 2
    assert 0.0 <= metrics["holdout"]["accuracy"] <= 1.0
    oof = pq.read_table(io.BytesIO(body(f"models/{version}/oof.parquet"))).to_pandas()
    index_ptr = json.loads(body("index/latest.json"))
    assert meta["index_snapshot"] == index_ptr["snapshot"]
    assert len(oof) == index_ptr["status_counts"]["ok"] - _holdout_rows(body, index_ptr)
    assert set(oof["fold"]) == {0, 1}

    score = darkroom("score", "--storage", storage, "--cache-dir", str(cache))
    scored = _json_tail(score.stdout)
    assert scored["version"] == version
    assert scored["scored"] == len(incoming)
    assert scored["failed"] == 0
    pred_files = objects(f"predictions/{version}/")
    assert pred_files and all(k.endswith(".parquet") for k in pred_files)
    tables = [pq.read_table(io.BytesIO(body(k))) for k in sorted(pred_files)]
    for t in tables:
        assert t.column_names == PREDICTION_COLUMNS
        assert t.schema.equals(PREDICTION_SCHEMA, check_metadata=False)
    preds = [row for t in tables for row in t.to_pylist()]
    assert len(preds) == len(incoming)
    pairs = [(r["key"], r["etag"]) for r in preds]
    assert len(set(pairs)) == len(pairs)
    assert set(pairs) == {(k, v["ETag"].strip('"')) for k, v in incoming.items()}
    for r in preds:
        assert r["status"] == "ok" and r["error"] == ""
        assert r["model_version"] == version
        assert r["label"] in meta["classes"]
        assert r["topk_labels"][0] == r["label"]
        assert 0.0 < r["confidence"] <= 1.0
        assert r["topk_probs"][0] == pytest.approx(r["confidence"])
        assert r["scored_at"] is not None

    status = darkroom("status", "--storage", storage)
    assert f"champion: {version}" in status.stdout
    assert "test_resnet" in status.stdout

    again = darkroom("score", "--storage", storage, "--cache-dir", str(cache))
    rerun = _json_tail(again.stdout)
    assert rerun["scored"] == 0
    assert rerun["already_scored"] == len(incoming)
    assert set(objects(f"predictions/{version}/")) == set(pred_files)
    # The user's images were never rewritten, moved or deleted.
    assert {
        k: v["ETag"] for k, v in {**objects("labeled/"), **objects("incoming/")}.items()
    } == sources_before


def _holdout_rows(body, pointer: dict) -> int:
    df = pq.read_table(io.BytesIO(body(pointer["key"]))).to_pandas()
    return int(((df["status"] == "ok") & (df["split"] == "holdout")).sum())
