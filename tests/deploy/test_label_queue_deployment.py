"""The label-queue deployment of deployments/prefect.yaml: run by hand (its form is
LabelQueueConfig) or by an automation, never on a schedule."""

from __future__ import annotations

from prefect.flows import load_flow_from_entrypoint

from darkroom.config import LabelQueueConfig
from tasks.deployments import load_spec

SPEC = load_spec()
(DEPLOYMENT,) = [d for d in SPEC["deployments"] if d["name"] == "label-queue"]


def test_the_label_queue_deployment_runs_its_flow_with_the_config_as_its_form():
    flow = load_flow_from_entrypoint(DEPLOYMENT["entrypoint"])
    assert flow.name == "label-queue" and DEPLOYMENT["entrypoint"].startswith("flows.")
    params = flow.validate_parameters(DEPLOYMENT["parameters"])
    assert params.get("config") in (None, LabelQueueConfig())
    given = flow.validate_parameters({"config": {"n": 50, "strategy": "entropy"}})["config"]
    assert isinstance(given, LabelQueueConfig) and (given.n, given.strategy) == (50, "entropy")
    assert not DEPLOYMENT.get("schedules")
    (trigger,) = DEPLOYMENT["triggers"]  # on drift, when no labels were added to retrain on
    assert trigger["expect"] == ["darkroom.drift.detected"]
    assert trigger["match"]["darkroom.labels-added"] == "false"
    assert DEPLOYMENT["concurrency_limit"]["limit"] == 1
