"""deployments/prefect.yaml, checked by loading it and the flows it names: entrypoints,
schedules, triggers, concurrency limits and parameters (validated against each flow's
signature). Also: `darkroom serve` builds exactly these deployments from the same file."""

from __future__ import annotations

from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes
from prefect.events.schemas.events import Resource
from prefect.flows import load_flow_from_entrypoint
from pydantic import TypeAdapter

from darkroom.config import RetrainConfig, ScoreConfig, TrainConfig
from darkroom.storage import LocalStorage
from darkroom.watch import ARRIVED, WatchConfig, resource_id
from flows.serve import PREFECT_YAML, ROOT, build_deployments, load_spec

SPEC = load_spec()
BY_NAME = {d["name"]: d for d in SPEC["deployments"]}
DEFS = SPEC["definitions"]


def flow_of(name: str):
    path, func = BY_NAME[name]["entrypoint"].split(":")
    assert (ROOT / path).is_file()  # entrypoints are relative to the repository root
    return load_flow_from_entrypoint(f"{ROOT / path}:{func}")


def validated(name: str) -> dict:
    """The deployment's parameters as the flow will receive them (pydantic-validated)."""
    return flow_of(name).validate_parameters(BY_NAME[name]["parameters"])


def triggers(name: str) -> list:
    specs = [
        {"name": f"{name}__automation_{i}", **t}
        for i, t in enumerate(BY_NAME[name].get("triggers") or [], 1)
    ]
    return [TypeAdapter(DeploymentTriggerTypes).validate_python(t) for t in specs]


def limit(name: str) -> ConcurrencyLimitConfig:
    return ConcurrencyLimitConfig(**BY_NAME[name]["concurrency_limit"])


def test_three_deployments_of_the_three_flows():
    assert PREFECT_YAML == ROOT / "deployments" / "prefect.yaml"
    assert set(BY_NAME) == {"nightly-retrain", "score-new-images", "watch-incoming"}
    for name in BY_NAME:  # each deployment is named after its flow
        assert flow_of(name).name == name


def test_nightly_retrain_runs_at_two_in_the_configured_timezone_and_never_overlaps():
    d = BY_NAME["nightly-retrain"]
    (schedule,) = d["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule.get("active", True)
    assert schedule["timezone"] == DEFS["timezone"]
    ZoneInfo(schedule["timezone"])  # a real IANA name
    lim = limit("nightly-retrain")
    assert lim.limit == 1 and lim.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert d["work_pool"]["name"] == DEFS["work_pools"]["gpu"]["name"] == "darkroom-gpu"
    assert not d.get("triggers")


def test_nightly_retrain_parameters_are_its_pydantic_config():
    config = validated("nightly-retrain")["config"]
    assert isinstance(config, RetrainConfig) and isinstance(config.train, TrainConfig)
    given = BY_NAME["nightly-retrain"]["parameters"]["config"]["train"]
    assert config.train.model_dump(include=set(given)) == given
    assert config.train.folds >= 2 and config.train.epochs >= 1


def test_score_new_images_is_triggered_by_arrivals_with_bursts_debounced():
    arrival, promotion = triggers("score-new-images")
    assert isinstance(arrival, DeploymentEventTrigger) and arrival.enabled
    assert arrival.expect == {ARRIVED}
    assert arrival.posture == "Reactive" and arrival.threshold == 1
    # Reactive with a window: the first arrival fires, later ones inside the window do not.
    assert arrival.within >= timedelta(seconds=30)
    # ... and it matches the resource the watcher emits for any storage root.
    for uri in ("s3://bucket/prod", LocalStorage("/tmp/x").uri):
        storage = type("S", (), {"uri": uri})()
        assert arrival.match.matches(Resource({"prefect.resource.id": resource_id(storage)}))
    assert arrival.parameters in (None, {})  # a plain run: what no model has scored
    lim = limit("score-new-images")
    assert lim.limit == 1 and lim.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_score_new_images_rescores_after_a_promotion_when_configured():
    _, promotion = triggers("score-new-images")
    assert promotion.expect == {"darkroom.model.promoted"}
    assert promotion.enabled is DEFS["rescore_on_promotion"]
    assert promotion.parameters == {"rescore": True}
    assert (
        flow_of("score-new-images").validate_parameters(
            {**BY_NAME["score-new-images"]["parameters"], **promotion.parameters}
        )["rescore"]
        is True
    )


def test_score_new_images_has_an_hourly_safety_net_and_valid_parameters():
    (schedule,) = BY_NAME["score-new-images"]["schedules"]
    assert schedule["cron"] == "0 * * * *" and schedule["timezone"] == DEFS["timezone"]
    params = validated("score-new-images")
    assert isinstance(params["config"], ScoreConfig) and params["rescore"] is False


def test_watch_incoming_runs_every_few_minutes():
    (schedule,) = BY_NAME["watch-incoming"]["schedules"]
    assert schedule["interval"] == DEFS["watch_every_seconds"]
    assert 30 <= schedule["interval"] <= 15 * 60
    assert isinstance(
        flow_of("watch-incoming").validate_parameters({"config": {"storage": "s3://bucket/x"}})[
            "config"
        ],
        WatchConfig,
    )
    assert validated("watch-incoming") == {"config": None}  # storage: DARKROOM_STORAGE


@pytest.mark.parametrize(
    "overrides", [{}, {"timezone": "Europe/Berlin", "watch_every": 60, "demo": True}]
)
def test_darkroom_serve_builds_the_same_deployments(overrides):
    served = {d.name: d for d in build_deployments(SPEC, **overrides)}
    assert set(served) == set(BY_NAME)
    tz = overrides.get("timezone", DEFS["timezone"])
    for name, d in served.items():
        spec = BY_NAME[name]
        assert [s.schedule.timezone for s in d.schedules] == [tz]
        assert d.concurrency_limit == limit(name).limit
        assert d.concurrency_options.collision_strategy == limit(name).collision_strategy
        assert [t.expect for t in d.triggers] == [t.expect for t in triggers(name)]
        assert [t.enabled for t in d.triggers] == [t.enabled for t in triggers(name)]
        if name != "nightly-retrain" or not overrides.get("demo"):
            assert d.parameters == spec["parameters"]
    assert served["nightly-retrain"].schedules[0].schedule.cron == "0 2 * * *"
    every = served["watch-incoming"].schedules[0].schedule.interval
    assert every == timedelta(seconds=overrides.get("watch_every", DEFS["watch_every_seconds"]))
    if overrides.get("demo"):  # trains in minutes on a CPU, without downloading weights
        config = flow_of("nightly-retrain").validate_parameters(
            served["nightly-retrain"].parameters
        )["config"]
        assert config.train.image_size == 32 and not config.train.pretrained
