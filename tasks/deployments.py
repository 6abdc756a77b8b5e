"""prefect.yaml's deployments as Prefect objects, served from one process (``darkroom serve``
supervises this; ``prefect deploy --all`` registers the same file for workers)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import yaml
from prefect import Flow
from prefect import serve as prefect_serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
from prefect.schedules import Cron, Interval
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, Settings, temporary_settings
from pydantic import TypeAdapter

from tasks.gpus import ensure_gpu_limit, visible_gpus

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or image) holding deployments/
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def load_spec(path: Path = PREFECT_YAML) -> dict:
    """prefect.yaml as a dict (YAML anchors resolved)."""
    return yaml.safe_load(Path(path).read_text())


def load_flow(entrypoint: str):
    """The flow an entrypoint names: a module path (``flows.retrain.nightly_retrain``, what
    prefect.yaml uses) or a file relative to the checkout (``flows/retrain.py:nightly_retrain``,
    imported as the module ``flows.retrain`` all the same, so both give the same flow object)."""
    if ":" in entrypoint:
        path, func = entrypoint.rsplit(":", 1)
        module = path.removesuffix(".py").replace("/", ".")
    else:
        module, func = entrypoint.rsplit(".", 1)
    flow = getattr(importlib.import_module(module), func)
    if not isinstance(flow, Flow):
        raise TypeError(f"{entrypoint} is not a Prefect flow")
    return flow


def deployment_args(
    d: dict,
    *,
    timezone: str | None = None,
    watch_every: float | None = None,
    demo_train: dict | None = None,
) -> dict:
    """Keyword arguments of ``Flow.to_deployment`` for one deployment of prefect.yaml;
    ``demo_train``: the nightly retrain trains with this recipe (``darkroom serve --demo``)."""
    schedules = []
    for s in d.get("schedules") or []:
        tz = timezone or s.get("timezone")
        if "cron" in s:
            schedules.append(Cron(s["cron"], timezone=tz, active=s.get("active", True)))
        else:
            every = watch_every if watch_every and d["name"] == "watch-incoming" else s["interval"]
            schedules.append(Interval(every, timezone=tz, active=s.get("active", True)))
    triggers = []
    for i, t in enumerate(d.get("triggers") or []):
        t = {"name": f"{d['name']}__automation_{i + 1}", **t}
        triggers.append(TypeAdapter(DeploymentTriggerTypes).validate_python(t))
    limit = d.get("concurrency_limit")
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(**limit)
    parameters = dict(d.get("parameters") or {})
    if demo_train and d["name"] == "nightly-retrain":
        parameters["config"] = {
            **(parameters.get("config") or {}),
            "num_workers": 0,
            "train": demo_train,
        }
    return {
        "name": d["name"],
        "description": d.get("description"),
        "tags": d.get("tags"),
        "schedules": schedules,
        "triggers": triggers,
        "concurrency_limit": limit,
        "parameters": parameters,
    }


def build_deployments(spec: dict, **overrides) -> list:
    return [
        load_flow(d["entrypoint"]).to_deployment(**deployment_args(d, **overrides))
        for d in spec["deployments"]
    ]


def settings_without(variable: str):
    """Prefect's settings as they would be without the environment variable ``variable``: what
    the profile, ``prefect.toml`` and ``.env`` say (darkroom.cli.tempserver asks)."""
    saved = os.environ.pop(variable, None)
    try:
        return Settings()
    finally:
        if saved is not None:
            os.environ[variable] = saved


def configured_api_url() -> tuple[str | None, str | None]:
    """(API URL, UI URL) of the server Prefect's settings name (PREFECT_API_URL), if any."""
    return PREFECT_API_URL.value(), PREFECT_UI_URL.value()


def serve_deployments(api_url: str, ui_url: str, started_server: bool, **overrides) -> None:
    """Registers prefect.yaml's deployments on the server at ``api_url`` and serves them until
    Ctrl-C or SIGTERM (Prefect's runner)."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployments = build_deployments(load_spec(), **overrides)
        gpus = visible_gpus()
        if gpus and ensure_gpu_limit(gpus):
            print(f"created the global concurrency limit darkroom-gpu: {gpus} slots", flush=True)
        print(
            f"\nPrefect UI: {ui_url}\n  storage: {os.environ['DARKROOM_STORAGE']}\n"
            f"  run the nightly retrain now: PREFECT_API_URL={api_url} prefect deployment "
            "run nightly-retrain/nightly-retrain\n  Ctrl-C stops darkroom serve"
            + (" and the server it started" if started_server else "")
            + "\n",
            flush=True,
        )
        prefect_serve(*deployments, print_starting_message=True)
