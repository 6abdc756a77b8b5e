"""The weekly cleanup deployment in deployments/prefect.yaml: it deletes (apply: true), once a
week in the configured timezone, one run at a time, and `darkroom serve` serves it as written."""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

from darkroom.config import CleanupConfig
from tasks.deployments import build_deployments, load_spec

SPEC = load_spec()
CLEANUP = next(d for d in SPEC["deployments"] if d["name"] == "cleanup")


def test_cleanup_runs_weekly_and_deletes():
    flow = load_flow_from_entrypoint(CLEANUP["entrypoint"])
    assert flow.name == "cleanup"
    config = flow.validate_parameters(CLEANUP["parameters"])["config"]
    assert isinstance(config, CleanupConfig) and config.apply is True
    assert config.keep_versions == CleanupConfig().keep_versions  # the defaults, set once
    (schedule,) = CLEANUP["schedules"]
    assert schedule["timezone"] == SPEC["definitions"]["timezone"]
    cron = Cron(schedule["cron"], timezone=schedule["timezone"])
    minute, hour, day, month, weekday = cron.cron.split()
    assert (day, month) == ("*", "*") and weekday.isdigit() and hour.isdigit()
    assert CLEANUP["work_pool"]["name"] == SPEC["definitions"]["work_pools"]["process"]["name"]


def test_darkroom_serve_serves_the_cleanup_deployment_as_written():
    (served,) = build_deployments({"deployments": [CLEANUP]})
    assert served.parameters == CLEANUP["parameters"]
    assert [s.schedule.cron for s in served.schedules] == [CLEANUP["schedules"][0]["cron"]]
    assert served.concurrency_limit == 1
    assert served.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
