"""darkroom's events on a real Prefect server (`darkroom serve`, one server for this module):
a burst of arrival events starts one scoring run (prefect.yaml's score-on-arrival trigger),
a retrain the gate rejects fires deployments/automations.yaml's rejection automation, and drift
starts an early retrain only when labels were added (once per cooldown), else a labeling queue.
(That a drifted scoring run emits the event is tests/e2e/test_drift.py's.)"""

from __future__ import annotations

import json
import time

import pytest

from darkroom.scoring.watch import ARRIVED, resource_id
from tasks.monitoring import DRIFT_DETECTED, LABELS_ADDED
from tasks.reporting import REJECTED
from tests.conftest import write_digits
from tests.e2e.service import TINY_RETRAIN, Service

pytestmark = pytest.mark.slow
BURST = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("events")).start()
    yield service
    service.kill()


def events(server: Service, names: list[str], at_least: int, timeout: float = 60) -> list[dict]:
    """The events of these names the server stored, once ``at_least`` of them are there."""
    body = {"filter": {"event": {"name": names}}, "limit": 50}
    deadline = time.monotonic() + timeout
    while len(found := server.post("/events/filter", body)["events"]) < at_least:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return found


def runs_of(server: Service, flow_name: str) -> list[dict]:
    """Every run of the flow, whatever its state."""
    body = {"flows": {"name": {"any_": [flow_name]}}, "limit": 50}
    return server.post("/flow_runs/filter", body)


def test_a_burst_of_arrivals_starts_one_scoring_run(server):
    assert runs_of(server, "score-new-images") == []
    rid = resource_id(server.storage)
    for i in range(BURST):  # as fast as an operator's shell sends them: well within 120 s
        server.prefect("event", "emit", ARRIVED, "--resource-id", rid, "-p", f'{{"count": {i}}}')
    assert len(events(server, [ARRIVED], at_least=BURST)) == BURST
    deadline = time.monotonic() + 60
    while not runs_of(server, "score-new-images") and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(10)  # the triggers service has seen every event of the burst by now
    runs = runs_of(server, "score-new-images")
    assert len(runs) == 1, [r["name"] for r in runs]
    assert runs[0]["created_by"]["type"] == "AUTOMATION"


def test_a_rejected_retrain_fires_the_rejection_automation(server):
    server.prefect("automation", "create", "--from-file", "deployments/automations.yaml")
    automations = {a["name"]: a for a in server.post("/automations/filter", {"limit": 50})}
    write_digits(server.storage, classes=("0", "1", "2"), per_class=12)
    # A first model must reach min_metric 1.0 on the holdout: one epoch at a tiny lr cannot.
    config = {
        **TINY_RETRAIN,
        "min_metric": 1.0,
        "train": {**TINY_RETRAIN["train"], "epochs": 1, "lr": 1e-6, "lr_min": 1e-7},
    }
    run = server.wait_run(
        server.run_deployment("nightly-retrain/nightly-retrain", {"config": config})
    )
    assert run["state_type"] == "COMPLETED", server.tail()
    (rejected,) = events(server, [REJECTED], at_least=1)
    assert "below min_metric 1" in rejected["payload"]["rule"]

    rejection, failure = (
        f"prefect.automation.{automations[name]['id']}"
        for name in ("darkroom-model-rejected", "darkroom-nightly-retrain-failed")
    )
    deadline = time.monotonic() + 60
    while True:  # the actions service runs the action a moment after the trigger fires
        fired = events(server, ["prefect.automation.action.executed"], at_least=1)
        ran = {e["resource"]["prefect.resource.id"] for e in fired} & {rejection, failure}
        if ran or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert ran == {rejection}, json.dumps(fired, indent=1)  # not the failure alert: it completed
    (triggered,) = [
        e
        for e in events(server, ["prefect.automation.triggered"], at_least=1)
        if e["resource"]["prefect.resource.id"] == rejection
    ]
    assert triggered["payload"]["triggering_event"]["id"] == rejected["id"]


def _by_automation(server: Service, flow_name: str) -> list[dict]:
    """The flow's runs that a trigger started (a run started by hand has no creator)."""
    runs = runs_of(server, flow_name)
    return [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]


def test_drift_retrains_early_only_with_new_labels_and_once_per_cooldown(server):
    rid = resource_id(server.storage)

    def drift(added: str, n: int) -> None:
        resource = json.dumps({"prefect.resource.id": rid, LABELS_ADDED: added})
        server.prefect("event", "emit", DRIFT_DETECTED, "--resource", resource, "-p", "{}")
        events(server, [DRIFT_DETECTED], at_least=n)

    before = len(_by_automation(server, "nightly-retrain"))
    drift("false", 1)  # nothing new to learn from: people are asked for labels instead
    deadline = time.monotonic() + 60
    while not _by_automation(server, "label-queue") and time.monotonic() < deadline:
        time.sleep(1)
    assert len(_by_automation(server, "label-queue")) == 1
    assert len(_by_automation(server, "nightly-retrain")) == before
    drift("true", 2)
    drift("true", 3)  # within the cooldown (6 h): no second early retrain
    deadline = time.monotonic() + 60
    while len(_by_automation(server, "nightly-retrain")) == before:
        assert time.monotonic() < deadline, "no early retrain started"
        time.sleep(1)
    time.sleep(10)  # the triggers service has seen the second event by now
    assert len(_by_automation(server, "nightly-retrain")) == before + 1
    assert len(_by_automation(server, "label-queue")) == 1
