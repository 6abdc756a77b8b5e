"""The flows' configs as the Prefect UI renders them: a form with every field's default and
description, not a null parameter."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema

from flows.retrain import nightly_retrain
from flows.score import score_new_images
from flows.watch import watch_incoming


@pytest.mark.parametrize("flow", [nightly_retrain, score_new_images, watch_incoming])
def test_the_config_parameter_is_a_form_with_defaults_and_descriptions(flow):
    schema = parameter_schema(flow.fn).model_dump()
    config = schema["properties"]["config"]
    assert isinstance(config["default"], dict) and config["default"], "renders as null"
    for name, model in schema["definitions"].items():
        for field, spec in model["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_the_retrain_form_holds_the_recipe():
    default = parameter_schema(nightly_retrain.fn).model_dump()["properties"]["config"]["default"]
    assert default["train"]["backbone"] == "resnet18" and default["train"]["pretrained"] is True
    assert default["storage"] is None  # resolved where the run executes ($DARKROOM_STORAGE)
