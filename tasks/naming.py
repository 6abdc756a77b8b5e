"""What every darkroom flow is declared with: its name, readable run names, prints as logs and a
timeout for the whole run."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime


def flow_options(name: str, kind: str, timeout_seconds: float) -> dict:
    """What every darkroom flow is declared with: its name, run names of ``kind`` (see
    run_name), prints as logs, and a timeout for the whole run."""
    return {
        "name": name,
        "flow_run_name": run_name(kind),
        "log_prints": True,
        "timeout_seconds": timeout_seconds,
    }


def run_name(kind: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<kind>-<what>-<UTC time>``, e.g.
    ``retrain-resnet18-5folds-6ep-20261123T020000Z`` or ``score-20261123T020000Z``. Names are
    safe as storage keys (the retrain flow names its quarantine report after its run)."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters or {}
        parts = [kind]
        config = params.get("config")
        train = _field(config, "train")
        if kind == "retrain":
            from darkroom.config import TrainConfig

            t = (
                TrainConfig.model_validate(train or {})
                if not isinstance(train, TrainConfig)
                else train
            )
            parts += [
                t.backbone.replace("/", "_").replace(".", "_"),
                f"{t.folds}folds",
                f"{t.epochs}ep",
            ]
        if params.get("rescore") or _field(config, "rescore"):
            parts.append("rescore")
        return "-".join([*parts, f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"])

    return name


def _field(obj, name: str):
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
