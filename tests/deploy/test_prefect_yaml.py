"""deployments/prefect.yaml, checked by loading it and the flows it names: entrypoints,
pull steps, schedules, triggers, concurrency limits and parameters (validated against each
flow's signature). Also: `darkroom serve` builds exactly these deployments from the same file,
and deployments/automations.yaml holds valid Prefect automations."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
from datetime import timedelta
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger, DeploymentTriggerTypes
from prefect.events.schemas.automations import AutomationCore, EventTrigger
from prefect.events.schemas.events import Resource
from prefect.flows import load_flow_from_entrypoint
from pydantic import BaseModel, TypeAdapter
from rich.console import Console

from darkroom.cli.demo import DEMO_TRAIN
from darkroom.config import RetrainConfig, ScoreConfig, TrainConfig
from darkroom.scoring.watch import ARRIVED, WatchConfig, resource_id
from darkroom.storage import LocalStorage
from tasks.deployments import PREFECT_YAML, ROOT, build_deployments, load_flow, load_spec
from tasks.reporting import REJECTED
from tests.deploy.automations import AUTOMATIONS_YAML, automations, with_notifications

SPEC = load_spec()
BY_NAME = {d["name"]: d for d in SPEC["deployments"]}
DEFS = SPEC["definitions"]


def flow_of(name: str):
    """The flow, loaded the way `prefect deploy` and a worker load it."""
    return load_flow_from_entrypoint(BY_NAME[name]["entrypoint"])


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


def test_every_deployment_runs_the_flow_it_is_named_after():
    assert PREFECT_YAML == ROOT / "deployments" / "prefect.yaml"
    assert set(BY_NAME) == {
        "nightly-retrain", "score-new-images", "watch-incoming", "promote-version", "rollback",
        "cleanup", "label-queue",
    }  # fmt: skip
    for name in BY_NAME:  # each deployment is named after its flow
        assert flow_of(name).name == name


def test_entrypoints_are_modules_of_the_installed_package_and_nothing_is_pulled():
    """A worker anywhere runs them: no file path, no working directory, no variable."""
    for name, d in BY_NAME.items():
        module, func = d["entrypoint"].rsplit(".", 1)
        assert ":" not in d["entrypoint"] and module.startswith("flows.")
        assert flow_of(name) is load_flow(d["entrypoint"])
        assert "pull" not in d  # the top-level `pull: []` applies to all
    assert SPEC["pull"] == []  # absent would record the deploying folder as a pull step
    assert "{{ $" not in PREFECT_YAML.read_text()  # no environment variable to set
    assert "DARKROOM_HOME" not in PREFECT_YAML.read_text()


def test_prefect_deploy_reads_the_file_as_written():
    """What `prefect deploy --all` loads (Prefect warns and skips an invalid file)."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions

    out = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(PREFECT_YAML, console=Console(file=out))
    assert out.getvalue() == ""
    assert [c["entrypoint"] for c in configs] == [d["entrypoint"] for d in SPEC["deployments"]]
    assert actions["pull"] == []  # an explicit "no pull steps", not "generate a default one"


def test_the_entrypoints_import_from_any_directory(tmp_path):
    """In a fresh folder without PYTHONPATH, as a process worker starts a flow run."""
    code = (
        "import sys\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        "print(*[load_flow_from_entrypoint(e).name for e in sys.argv[1:]])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DARKROOM_HOME")}
    entrypoints = [d["entrypoint"] for d in SPEC["deployments"]]
    out = subprocess.run(
        [sys.executable, "-c", code, *entrypoints],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [d["name"] for d in SPEC["deployments"]]


def test_serve_loads_module_and_file_entrypoints_alike():
    flow = load_flow("flows.retrain.nightly_retrain")
    assert flow is load_flow("flows/retrain.py:nightly_retrain") and flow.name == "nightly-retrain"
    with pytest.raises(TypeError, match="not a Prefect flow"):
        load_flow("flows.retrain.candidate_version")


def test_nightly_retrain_runs_at_two_in_the_configured_timezone_and_never_overlaps():
    d = BY_NAME["nightly-retrain"]
    (schedule,) = d["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule.get("active", True)
    assert schedule["timezone"] == DEFS["timezone"]
    ZoneInfo(schedule["timezone"])  # a real IANA name
    lim = limit("nightly-retrain")
    assert lim.limit == 1 and lim.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert d["work_pool"]["name"] == DEFS["work_pools"]["gpu"]["name"] == "darkroom-gpu"
    (trigger,) = d["triggers"]  # early, on drift, only when labels were added since the champion
    assert trigger["expect"] == ["darkroom.drift.detected"]
    assert trigger["match"]["darkroom.labels-added"] == "true"
    assert trigger["within"] == DEFS["drift_retrain_cooldown_seconds"] > 0


def test_nightly_retrain_parameters_are_its_pydantic_config():
    config = validated("nightly-retrain")["config"]
    assert isinstance(config, RetrainConfig) and isinstance(config.train, TrainConfig)
    assert config.train.folds >= 2 and config.train.epochs >= 1


def flow_defaults(name: str) -> dict:
    """The flow's parameter defaults, pydantic configs as the JSON the UI's form shows."""
    signature = inspect.signature(flow_of(name).fn).parameters.values()
    return {
        p.name: p.default.model_dump(mode="json") if isinstance(p.default, BaseModel) else p.default
        for p in signature
        if p.default is not inspect.Parameter.empty
    }


def restated(given: dict, defaults: dict, path: str = "") -> list[str]:
    """The keys of ``given`` (nested) whose value is the default's."""
    found = []
    for key, value in given.items():
        default = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(default, dict):
            found += restated(value, default, f"{path}{key}.")
        elif value == default:
            found.append(f"{path}{key}: {value!r}")
    return found


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_parameters_never_restate_a_default(name):
    """A default lives once, in the pydantic config: prefect.yaml sets only what differs (a
    restated default would silently stay behind when the config's default changes)."""
    given = BY_NAME[name].get("parameters") or {}
    assert restated(given, flow_defaults(name)) == []


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
    # No storage here: the flow's default config, which reads DARKROOM_STORAGE on the worker.
    assert validated("watch-incoming")["config"] in (None, WatchConfig())


DEMO_TRAIN_PARAMETERS = DEMO_TRAIN.model_dump(mode="json", exclude_defaults=True)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"timezone": "Europe/Berlin", "watch_every": 60, "demo_train": DEMO_TRAIN_PARAMETERS}],
)
def test_darkroom_serve_builds_the_same_deployments(overrides):
    """What `darkroom serve` registers; with --demo, the nightly retrain trains the demo's
    recipe (the CLI passes DEMO_TRAIN as ``demo_train``)."""
    served = {d.name: d for d in build_deployments(SPEC, **overrides)}
    assert set(served) == set(BY_NAME)
    tz = overrides.get("timezone", DEFS["timezone"])
    for name, d in served.items():
        spec = BY_NAME[name]
        assert [s.schedule.timezone for s in d.schedules] == [tz] * len(spec.get("schedules") or [])
        assert d.concurrency_limit == limit(name).limit
        assert d.concurrency_options.collision_strategy == limit(name).collision_strategy
        assert [t.expect for t in d.triggers] == [t.expect for t in triggers(name)]
        assert [t.enabled for t in d.triggers] == [t.enabled for t in triggers(name)]
        if name != "nightly-retrain" or not overrides.get("demo_train"):
            assert d.parameters == spec["parameters"]
    assert served["nightly-retrain"].schedules[0].schedule.cron == "0 2 * * *"
    every = served["watch-incoming"].schedules[0].schedule.interval
    assert every == timedelta(seconds=overrides.get("watch_every", DEFS["watch_every_seconds"]))
    if overrides.get("demo_train"):  # trains in minutes on a CPU, without downloading weights
        config = flow_of("nightly-retrain").validate_parameters(
            served["nightly-retrain"].parameters
        )["config"]
        assert config.train.image_size == 32 and not config.train.pretrained


# ---- deployments/automations.yaml ---------------------------------------------------------------


def test_automations_validate_as_prefect_creates_them():
    """`prefect automation create --from-file` validates each one with AutomationCore."""
    by_name = {a.name: a for a in map(AutomationCore.model_validate, automations())}
    assert set(by_name) == {
        "darkroom-nightly-retrain-failed", "darkroom-model-rejected", "darkroom-drift-detected"
    }  # fmt: skip
    for a in by_name.values():
        assert a.enabled and isinstance(a.trigger, EventTrigger)
        assert a.trigger.posture == "Reactive" and a.trigger.threshold == 1
        assert [act.type for act in a.actions] == ["do-nothing"]  # until a block is set up
    assert "DARKROOM_HOME" not in AUTOMATIONS_YAML.read_text()


def test_the_failure_automation_matches_failed_and_crashed_nightly_runs_only():
    trigger = AutomationCore.model_validate(automations()[0]).trigger
    assert trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    run = Resource({"prefect.resource.id": f"prefect.flow-run.{uuid4()}"})
    assert trigger.match.matches(run)

    def related(name: str):
        return Resource(
            {
                "prefect.resource.id": f"prefect.deployment.{uuid4()}",
                "prefect.resource.role": "deployment",
                "prefect.resource.name": name,
            }
        )

    assert trigger.match_related.matches(related("nightly-retrain"))
    assert not trigger.match_related.matches(related("score-new-images"))


def test_the_rejection_automation_matches_what_a_retrain_emits():
    trigger = AutomationCore.model_validate(automations()[1]).trigger
    assert trigger.expect == {REJECTED}
    for uri in ("s3://bucket/prod", LocalStorage("/tmp/x").uri):
        storage = type("S", (), {"uri": uri})()
        assert trigger.match.matches(Resource({"prefect.resource.id": resource_id(storage)}))


def test_the_documented_notification_action_is_valid():
    block = uuid4()
    for a in map(AutomationCore.model_validate, with_notifications(block)):
        (action,) = a.actions
        assert action.type == "send-notification" and action.block_document_id == block
        assert "{{ event.event }}" in action.body and "{{ automation.name }}" in action.subject
