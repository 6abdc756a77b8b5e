"""The operator's decisions on a real Prefect server with process workers (prefect.yaml
deployed as in test_workers.py): promote-version and rollback runs started through Prefect's
API move the champion exactly as `darkroom promote` / `rollback` do, and a nightly retrain with
require_approval waits Paused at the gate's verdict for a person's answer.

One root is trained once (two versions, no champion), in a process of its own while the server
starts: ``good`` (the LEARNS recipe, which the gate accepts as a first champion) and ``poor``
(TINY, which it rejects). Each test works on a copy; a retrain on a copy finds the folds trained
and only re-decides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from darkroom.cli.main import main
from darkroom.storage import LocalStorage
from tasks.deployments import PREFECT_YAML
from tests.conftest import LEARNS, TINY
from tests.e2e.service import ROOT, TERMINAL
from tests.e2e.test_workers import POOLS, Workers, lap, marked_processes

pytestmark = pytest.mark.slow


TRAIN = """
import json, sys
from darkroom.storage import LocalStorage
from tests.conftest import LEARNS, TINY, train_candidate, write_digits
storage = LocalStorage(sys.argv[1] + "/bucket")
write_digits(storage, per_class=24)
good = train_candidate(storage, sys.argv[1] + "/cache", LEARNS)
print(json.dumps([good, train_candidate(storage, sys.argv[1] + "/cache", TINY)]))
"""


@dataclass
class Trained:
    bucket: Path
    good: str
    poor: str

    def copy(self, to: Path) -> LocalStorage:
        shutil.copytree(self.bucket, to / "bucket")
        return LocalStorage(to / "bucket")


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """Trains the two versions in a process of its own, while the server starts."""
    tmp = tmp_path_factory.mktemp("trained")
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(tmp)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    yield tmp, proc, time.monotonic()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def trained(training, deployed) -> Trained:
    tmp, proc, t = training
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, "training the two versions failed (its stderr is above)"
    good, poor = json.loads(out.splitlines()[-1])
    lap("two versions trained (beside the server's start)", t)
    return Trained(tmp / "bucket", good, poor)


@pytest.fixture(scope="module")
def deployed(training, tmp_path_factory):
    """prefect.yaml deployed to its two process pools, one worker each (in an empty folder)."""
    t = time.monotonic()
    tmp = tmp_path_factory.mktemp("decisions")
    service = Workers(tmp)
    try:
        service.start()
        for pool in POOLS:
            service.prefect("work-pool", "create", pool, "--type", "process")
        service.prefect("--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all")
        for pool in POOLS:
            service.start_worker(pool)
        service.wait_workers_online()
        lap("server, deployments and workers", t)
        yield service
    finally:
        service.kill()
    assert not marked_processes(str(tmp)), "processes left running"


def start(service: Workers, name: str, config: dict) -> str:
    """A run of deployment ``name``, created through Prefect's API (what the UI's form does)."""
    with temporary_settings(updates={PREFECT_API_URL: service.api}):
        return str(run_deployment(name, parameters={"config": config}, timeout=0).id)


def runtime(storage: LocalStorage, tmp: Path) -> dict:
    return {"storage": storage.uri, "device": "cpu", "cache_dir": str(tmp / "cache")}


def records(storage: LocalStorage) -> list[dict]:
    """The promotion history, oldest first, without the times."""
    found = sorted(o.key for o in storage.list("models/promotions/"))
    return [untimed(storage.read_json(k)) for k in found]


def champion(storage: LocalStorage) -> dict | None:
    return storage.read_json("models/champion.json", missing_ok=True)


def untimed(record: dict | None) -> dict | None:
    return record and {k: v for k, v in record.items() if k != "at"}


def test_promote_version_and_rollback_runs_move_the_champion_as_the_cli_does(
    deployed, trained, tmp_path
):
    """The same five decisions by deployment runs on one copy and by the CLI on another leave
    the same pointer and history; the first, a candidate the gate rejects, changes nothing."""
    t = time.monotonic()
    by_flows, by_cli = trained.copy(tmp_path / "flows"), trained.copy(tmp_path / "cli")
    good, poor = trained.good, trained.poor
    steps = [  # (deployment, its parameters, the same decision as `darkroom` arguments)
        ("promote-version", {"version": poor}, ["promote", poor]),
        ("promote-version", {"version": good, "reason": "looks right"},
         ["promote", good, "--reason", "looks right"]),
        ("promote-version", {"version": poor, "force": True, "reason": "a hunch"},
         ["promote", poor, "--force", "--reason", "a hunch"]),
        ("rollback", {"reason": "worse in production"},
         ["rollback", "--reason", "worse in production"]),
        ("rollback", {"to_version": poor}, ["rollback", "--to", poor]),
    ]  # fmt: skip
    cli_runtime = ["--storage", by_cli.uri]
    for name, params, argv in steps:
        config = {**runtime(by_flows, tmp_path), **params}
        if name == "rollback":  # RollbackConfig: the storage root and the decision only
            config = {"storage": by_flows.uri, **params}
        run_id = start(deployed, f"{name}/{name}", config)
        extra = ["--device", "cpu", "--cache-dir", str(tmp_path / "cli-cache")]
        code = main([*argv, *cli_runtime, *(extra if name == "promote-version" else [])])
        run = deployed.wait_run(run_id)
        if params == {"version": poor}:  # refused: the run fails and nothing changes
            assert run["state_type"] == "FAILED" and code == 1, deployed.tail()
            message = run["state"]["message"]
            assert f"{poor} not promoted: rejected" in message and "force" in message, message
            assert champion(by_flows) is None and champion(by_cli) is None
        else:
            assert run["state_type"] == "COMPLETED" and code == 0, deployed.tail()
        assert untimed(champion(by_flows)) == untimed(champion(by_cli)), (name, params)
        assert records(by_flows) == records(by_cli), (name, params)
    lap("five decisions by deployment runs and by the CLI", t)
    history = records(by_flows)
    assert [(r["action"], r["version"], r["previous"]) for r in history] == [
        ("manual-promote", good, None),
        ("manual-promote", poor, good),
        ("rollback", good, poor),
        ("rollback", poor, good),
    ]
    assert history[0]["reason"].startswith("manual promotion through the gate: promoted:")
    assert history[0]["reason"].endswith("; reason: looks right")
    assert history[1]["reason"] == "manual promotion (force: gate skipped); reason: a hunch"
    assert history[2]["reason"] == f"rollback from {poor}: worse in production"
    assert history[3]["reason"] == f"rollback from {good}"
    assert champion(by_flows)["version"] == poor
    changes = deployed.post(
        "/artifacts/filter", {"artifacts": {"key": {"any_": ["champion-change"]}}}
    )
    assert len(changes) == len(steps)  # one per run, the refused one too
    assert any(a["data"].startswith(f"# Not promoted: `{poor}`") for a in changes)


# ---- approval before a promotion ----------------------------------------------------------------


def retrain(service: Workers, storage: LocalStorage, tmp: Path, train=LEARNS, **config) -> str:
    """A nightly-retrain run with require_approval on ``storage`` (a copy of the trained root:
    the folds are there, so it finalises, measures and decides)."""
    params = {
        **runtime(storage, tmp),
        "num_workers": 0,
        "train": train.model_dump(mode="json"),
        "require_approval": True,
        "approval_timeout_seconds": 120,
        **config,
    }
    return start(service, "nightly-retrain/nightly-retrain", params)


def paused(service: Workers, run_id: str, timeout: float = 180) -> dict:
    """The run once it is Paused (it fails the test if it ends first)."""
    deadline = time.monotonic() + timeout
    while (run := service.get(f"/flow_runs/{run_id}"))["state_type"] != "PAUSED":
        assert run["state_type"] not in TERMINAL, f"{run['state_name']}\n{service.tail()}"
        assert time.monotonic() < deadline, f"not paused in time\n{service.tail()}"
        time.sleep(0.5)
    return run


def answer(service: Workers, run: dict, approve: bool, note: str) -> None:
    """Resumes the paused run with the form's answer, as the UI's Resume button does (the
    form is accepted once the run has saved its schema)."""
    deadline = time.monotonic() + 60
    while True:
        body = {"run_input": {"approve": approve, "note": note}}
        result = service.post(f"/flow_runs/{run['id']}/resume", body)
        if result["status"] == "ACCEPT":
            return
        assert "schema not found" in str(result["details"]), result
        assert time.monotonic() < deadline, result
        time.sleep(0.5)


def description(service: Workers, run: dict) -> str:
    key = run["state"]["state_details"]["run_input_keyset"]["description"]
    return service.get(f"/flow_runs/{run['id']}/input/{key}")  # the markdown, JSON-encoded


def decision(storage: LocalStorage, version: str) -> dict:
    return storage.read_json(f"models/{version}/decision.json")


def test_an_approved_candidate_is_promoted_with_the_note_in_its_record(deployed, trained, tmp_path):
    t = time.monotonic()
    storage = trained.copy(tmp_path)
    run = paused(deployed, retrain(deployed, storage, tmp_path))
    t = lap("retrain paused at the gate", t)
    shown = description(deployed, run)
    assert f"# Approve `{trained.good}` as the champion?" in shown
    assert "majority-class baseline" in shown and "| accuracy |" in shown  # the figures
    assert decision(storage, trained.good)["approval"]["answer"] == "pending"
    assert champion(storage) is None  # nothing moves while it waits
    answer(deployed, run, approve=True, note="checked the mistakes")
    done = deployed.wait_run(run["id"])
    assert done["state_type"] == "COMPLETED", deployed.tail()
    lap("approved, promoted", t)
    record = champion(storage)
    assert record["version"] == trained.good and record["action"] == "promote"
    assert record["approval"]["answer"] == "approved"
    assert record["approval"]["note"] == "checked the mistakes"
    assert record["reason"].endswith("; approved by a person: checked the mistakes")
    kept = decision(storage, trained.good)
    assert kept["promote"] and kept["approval"] == record["approval"]


def test_a_rejected_candidate_is_not_promoted(deployed, trained, tmp_path):
    t = time.monotonic()
    storage = trained.copy(tmp_path)
    run = paused(deployed, retrain(deployed, storage, tmp_path))
    answer(deployed, run, approve=False, note="not before the audit")
    assert deployed.wait_run(run["id"])["state_type"] == "COMPLETED", deployed.tail()
    lap("paused, rejected by a person", t)
    assert champion(storage) is None
    kept = decision(storage, trained.good)
    assert kept["promote"]  # the gate's verdict stays the gate's
    assert kept["approval"]["answer"] == "rejected"
    assert kept["approval"]["note"] == "not before the audit"


def test_no_answer_in_time_promotes_nothing(deployed, trained, tmp_path):
    t = time.monotonic()
    storage = trained.copy(tmp_path)
    # long enough to be seen Paused on a busy machine, short enough to wait for
    run_id = retrain(deployed, storage, tmp_path, approval_timeout_seconds=20)
    paused(deployed, run_id)
    run = deployed.wait_run(run_id, timeout=120)
    lap("paused, timed out", t)
    assert run["state_type"] == "FAILED", deployed.tail()
    assert champion(storage) is None
    approval = decision(storage, trained.good)["approval"]
    assert approval["answer"] == "timed out" and approval["timeout_seconds"] == 20
    errors = {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": 40}}  # the run's error logs
    said = [g["message"] for g in deployed.post("/logs/filter", {"logs": errors, "limit": 50})]
    assert any("within 20 s (approval_timeout_seconds): not promoted" in m for m in said), said


def test_approval_never_overrides_a_gate_that_rejected(deployed, trained, tmp_path):
    t = time.monotonic()
    storage = trained.copy(tmp_path)
    run_id = retrain(deployed, storage, tmp_path, train=TINY)
    run = deployed.wait_run(run_id)
    lap("gate rejected, nobody asked", t)
    assert run["state_type"] == "COMPLETED", deployed.tail()
    states = deployed.get(f"/flow_run_states/?flow_run_id={run_id}")
    assert "PAUSED" not in {s["type"] for s in states}
    assert champion(storage) is None
    kept = decision(storage, trained.poor)
    assert not kept["promote"] and kept["approval"]["answer"] == "not asked"
