"""The operator's decisions in deployments/prefect.yaml: promote-version and rollback run by hand
from the UI's form (no schedule, no trigger) on the process pool, one at a time, with forms made
from their pydantic configs; and the nightly retrain's approval settings."""

from __future__ import annotations

import pytest
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from pydantic import ValidationError

from darkroom.config import PromoteVersionConfig, RetrainConfig, RollbackConfig
from tasks.deployments import build_deployments, load_spec
from tests.deploy.test_prefect_yaml import BY_NAME, DEFS, flow_of

DECISIONS = ("promote-version", "rollback")


@pytest.mark.parametrize("name", DECISIONS)
def test_decisions_run_by_hand_on_the_process_pool_one_at_a_time(name):
    d = BY_NAME[name]
    assert flow_of(name).name == name
    assert d["work_pool"]["name"] == DEFS["work_pools"]["process"]["name"]
    assert not d.get("schedules") and not d.get("triggers")
    limit = ConcurrencyLimitConfig(**d["concurrency_limit"])
    assert limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    (served,) = [s for s in build_deployments(load_spec()) if s.name == name]  # darkroom serve
    assert served.schedules == [] and served.parameters == d["parameters"]


def test_the_promote_version_form_asks_for_the_version_and_keeps_the_gate_defaults():
    flow = flow_of("promote-version")
    given = {**BY_NAME["promote-version"]["parameters"], "config": {"version": "abc-123"}}
    config = flow.validate_parameters(given)["config"]
    assert isinstance(config, PromoteVersionConfig)
    assert config.version == "abc-123" and not config.force and config.reason == ""
    gate = config.retrain_config()  # what the gate reads: the nightly retrain's defaults
    nightly = RetrainConfig()
    for field in ("min_delta", "max_class_recall_drop", "min_metric", "baseline_margin"):
        assert getattr(gate, field) == getattr(nightly, field), field
    assert gate.max_p_value == nightly.max_p_value and gate.train.metric == nightly.train.metric
    with pytest.raises(ValidationError, match="version"):  # the form cannot be sent without it
        PromoteVersionConfig.model_validate({})
    with pytest.raises(ValidationError, match="max_p_value"):
        PromoteVersionConfig(version="v", gate={"max_p_value": 0})  # the retrain's bounds too
    schema = flow.parameters.model_dump()["definitions"]["PromoteVersionConfig"]
    assert "version" in schema["required"] and schema["properties"]["version"]["description"]


def test_rollback_defaults_to_the_previous_champion():
    config = flow_of("rollback").validate_parameters(BY_NAME["rollback"]["parameters"])
    assert config in ({}, {"config": RollbackConfig()})
    assert RollbackConfig().to_version is None


def test_approval_is_off_by_default_with_a_timeout_the_run_can_wait_out():
    config = RetrainConfig()
    assert config.require_approval is False
    assert 3600 <= config.approval_timeout_seconds <= 24 * 3600
    nightly = flow_of("nightly-retrain").validate_parameters(
        BY_NAME["nightly-retrain"]["parameters"]
    )
    assert nightly["config"].require_approval is False
    with pytest.raises(ValidationError, match="approval_timeout_seconds"):
        RetrainConfig(approval_timeout_seconds=24 * 3600)  # longer than the run may last
