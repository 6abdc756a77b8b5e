"""darkroom as a service, against a real Prefect server: `darkroom serve` starts the server and
serves the three deployments; a manual nightly-retrain run from the CLI trains and shows its
artifacts; new images under incoming/ + the watcher -> an event -> a score-new-images run that
writes predictions; `prefect deploy --all` registers prefect.yaml as written; Ctrl-C stops it
all. Also the darkroom-gpu global concurrency limit on the real server."""

from __future__ import annotations

import contextvars
import socket
import threading
import time

import pytest

import tasks.gpus as gpus
from darkroom.scoring.chunks import read_predictions
from tests.conftest import write_digits
from tests.e2e.service import shared_service

pytestmark = pytest.mark.slow


@pytest.fixture
def service(request, tmp_path_factory):
    return shared_service(request, tmp_path_factory)


def arrived_events(service, at_least: int = 0, timeout: float = 30) -> list[dict]:
    """darkroom.images.arrived events the server stored (it stores them a moment later)."""
    body = {"filter": {"event": {"name": ["darkroom.images.arrived"]}}, "limit": 50}
    deadline = time.monotonic() + timeout
    while len(events := service.post("/events/filter", body)["events"]) < at_least:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return events


def test_serve_registers_every_deployment(service):
    deployments = {d["name"]: d for d in service.post("/deployments/filter", {"limit": 50})}
    assert set(deployments) == {
        "nightly-retrain", "score-new-images", "watch-incoming", "promote-version", "rollback",
        "cleanup", "label-queue",
    }  # fmt: skip
    nightly = deployments["nightly-retrain"]
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert "Prefect UI: " + service.ui in service.tail(100_000)


def test_a_manual_retrain_shows_its_progress_metrics_and_decision(service):
    run = service.retrained()
    assert run["name"].startswith("retrain-test_resnet-2folds-5ep-")
    tasks = service.post(
        "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 100}
    )
    names = {t["name"] for t in tasks}
    assert {"train-fold-0", "train-fold-1"} <= names
    artifacts = service.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 100}
    )
    by_type: dict[str, list] = {}
    for a in artifacts:
        by_type.setdefault(a["type"], []).append(a)
    progress = sorted(by_type["progress"], key=lambda a: a["description"])
    assert [a["data"] for a in progress] == [100.0, 100.0]  # each fold's last epoch
    assert progress[0]["description"].startswith("train-fold-0: fold 1 of 2, epoch 5 of 5")
    assert "val accuracy" in progress[0]["description"]
    assert {a["key"] for a in artifacts} >= {"fold-metrics", "promotion-decision"}
    decision = next(a for a in artifacts if a["key"] == "promotion-decision")
    assert "Promoted" in decision["data"] and "confusion.png" in decision["data"]


def test_new_images_and_the_watcher_start_a_scoring_run_from_the_event(service):
    service.retrained()  # a champion to score with
    truth = write_digits(service.storage, classes=("0",), per_class=0, incoming=6)
    incoming = {k for k in truth if k.startswith("incoming/")}
    assert len(incoming) == 6 and not service.flow_runs("score-new-images")

    watch = service.wait_run(service.run_deployment("watch-incoming/watch-incoming"))
    assert watch["state_type"] == "COMPLETED" and watch["name"].startswith("watch-")
    (event,) = arrived_events(service, at_least=1)
    assert event["payload"]["count"] == 6
    assert event["resource"]["prefect.resource.id"] == f"darkroom.storage.{service.storage.uri}"

    deadline = time.monotonic() + 120  # event -> automation -> flow run -> served process
    while not (runs := service.flow_runs("score-new-images")) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, service.tail()
    run = service.wait_run(runs[0]["id"])
    assert run["state_type"] == "COMPLETED", service.tail()
    assert run["created_by"]["type"] == "AUTOMATION"
    assert run["name"].startswith("score-")
    champion = service.storage.read_text("models/champion.json")
    version = __import__("json").loads(champion)["version"]
    preds = read_predictions(service.storage, version)
    assert set(preds["key"]) == incoming and (preds["status"] == "ok").all()
    chunk_runs = service.post(
        "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 50}
    )
    assert any(t["name"].startswith("score-chunk-") for t in chunk_runs)
    summary = service.post(
        "/artifacts/filter", {"artifacts": {"key": {"any_": ["scoring-summary"]}}, "limit": 5}
    )
    assert summary and "| 6 |" in summary[0]["data"].replace(" 6 |", "| 6 |")

    # Nothing new since: the next tick emits nothing and starts nothing.
    again = service.wait_run(service.run_deployment("watch-incoming/watch-incoming"))
    assert again["state_type"] == "COMPLETED"
    time.sleep(3)
    assert len(arrived_events(service)) == 1
    assert len(service.flow_runs("score-new-images")) == 1


def test_gpu_slots_never_exceed_the_gpus(service, monkeypatch, tmp_path):
    """The darkroom-gpu global concurrency limit on the real server: with 2 GPUs (torch
    mocked), 4 folds never hold more than 2 slots, never two on one GPU."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(gpus, "visible_gpus", lambda device="auto": 2)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    holding: dict[int, str] = {}
    peak, lock, errors = [0], threading.Lock(), []

    def fold(k):
        try:
            with gpus.gpu_slot("auto", poll_seconds=0.05) as dev:
                with lock:
                    assert dev not in holding.values()
                    holding[k] = dev
                    peak[0] = max(peak[0], len(holding))
                time.sleep(1.0)
                with lock:
                    del holding[k]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    with temporary_settings(updates={PREFECT_API_URL: service.api}):
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(fold, k))
            for k in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert peak[0] == 2
    limit = service.get("/v2/concurrency_limits/darkroom-gpu")
    assert limit["limit"] == 2 and limit["active_slots"] == 0


def test_prefect_deploy_registers_prefect_yaml_as_written(service):
    """The other way to run it: work pools + `prefect deploy --all` from the repo root."""
    for pool in ("darkroom-process", "darkroom-gpu"):
        service.prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
    out = service.prefect(
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        "deployments/prefect.yaml",
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr  # all three, with the pinned FastAPI
    deployments = {d["name"]: d for d in service.post("/deployments/filter", {"limit": 50})}
    nightly = deployments["nightly-retrain"]
    assert nightly["work_pool_name"] == "darkroom-gpu"
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert nightly["parameters"] == {"config": {}}  # prefect.yaml restates no default
    score = deployments["score-new-images"]
    assert score["schedules"][0]["schedule"]["cron"] == "0 * * * *"
    watch = deployments["watch-incoming"]
    assert watch["schedules"][0]["schedule"]["interval"] == 300
    automations = service.post("/automations/filter", {"limit": 50})
    mine = [
        a
        for a in automations
        if any(act.get("deployment_id") == score["id"] for act in a["actions"])
    ]
    by_event = {tuple(a["trigger"]["expect"]): a for a in mine}
    arrival = by_event[("darkroom.images.arrived",)]
    assert arrival["enabled"] and arrival["trigger"]["within"] == 120.0
    assert arrival["trigger"]["posture"] == "Reactive"
    promoted = by_event[("darkroom.model.promoted",)]
    assert promoted["actions"][0]["parameters"] == {"rescore": True}


def test_ctrl_c_stops_serve_and_the_server_it_started(service):
    assert service.interrupt() == 0
    assert "stopping the Prefect server" in service.tail()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", service.port)) != 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail("the Prefect server still listens after Ctrl-C")
