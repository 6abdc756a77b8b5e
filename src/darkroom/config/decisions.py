"""The parameters of the decisions an operator makes about the champion from the Prefect UI (or
the CLI): promote a named version, roll back."""

from __future__ import annotations

from copy import deepcopy

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from darkroom.config.flows import RetrainConfig
from darkroom.config.runtime import RuntimeConfig, StorageConfig
from darkroom.config.train import TrainConfig

# A promote-version or rollback run: it measures two models on the holdout at most.
DECISION_TIMEOUT_SECONDS = 3600

# The gate's settings and the config that declares each (its default and description live there).
GATE_DECLARED_IN = {
    "metric": TrainConfig,
    "min_delta": RetrainConfig,
    "max_class_recall_drop": RetrainConfig,
    "min_metric": RetrainConfig,
    "baseline_margin": RetrainConfig,
    "max_p_value": RetrainConfig,
    "tta": RetrainConfig,
}


def declared(model: type[BaseModel], name: str) -> tuple[type, FieldInfo]:
    """The field ``name`` as ``model`` declares it: type, default, bounds and description."""
    info = model.model_fields[name]
    return info.annotation, deepcopy(info)


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")


GateConfig = create_model(
    "GateConfig",
    __base__=_Fields,
    __module__=__name__,
    __doc__="The promotion gate's settings for a version promoted by hand: the nightly "
    "retrain's fields, with their defaults.",
    **{name: declared(model, name) for name, model in GATE_DECLARED_IN.items()},
)


class PromoteVersionConfig(StorageConfig):
    """Parameters of the ``promote_version`` flow (``darkroom promote``)."""

    version: str = Field(
        ...,
        min_length=1,
        description="The model version to make the champion (a folder under models/; "
        "`darkroom history` and the retrain runs name them).",
    )
    force: bool = Field(
        False,
        description="Promote even if the gate rejects it (the promotion record says the gate "
        "was skipped).",
    )
    reason: str = Field("", description="Why; kept in the promotion record.")
    device: str = declared(RuntimeConfig, "device")[1]
    cache_dir: str | None = declared(RuntimeConfig, "cache_dir")[1]
    gate: GateConfig = Field(
        default_factory=GateConfig,
        description="The gate the version must pass on the current holdout (unless force): "
        "the nightly retrain's rules and defaults.",
    )

    def retrain_config(self) -> RetrainConfig:
        """The retrain config the gate reads: this root, device, cache and gate."""
        gate = self.gate.model_dump()
        metric = gate.pop("metric")
        runtime = self.model_dump(include={"storage", "device", "cache_dir"})
        return RetrainConfig(**runtime, **gate, train=TrainConfig(metric=metric))


class RollbackConfig(StorageConfig):
    """Parameters of the ``rollback`` flow (``darkroom rollback``)."""

    to_version: str | None = Field(
        None,
        description="A version from the promotion history to return to. Empty: the champion "
        "before the current one.",
    )
    reason: str = Field("", description="Why; kept in the promotion record.")
