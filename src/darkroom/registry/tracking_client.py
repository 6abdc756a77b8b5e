"""The link to an MLflow tracking server (optional: the ``mlflow`` extra): whether it is on,
the guard every call goes through, and the ``champion`` alias that follows the champion pointer.

MLflow is on when ``MLFLOW_TRACKING_URI`` is set and mlflow is installed. It mirrors darkroom's
registry and never decides anything: a call that fails (server down, slow, refusing) logs one
warning, MLflow is left alone for ``PAUSE_SECONDS`` in this process, and darkroom goes on.
mlflow is imported only when it is on.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"  # where versions are registered (default: URI_ENV)
MODEL_ENV = "DARKROOM_MLFLOW_MODEL"  # the registered model's name
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable for the experiment
DEFAULT_NAME = "darkroom"  # of the registered model and of the experiment
VERSION_TAG = "darkroom.version"  # darkroom's version id, on runs and model versions
CHAMPION, CHALLENGER = "champion", "challenger"
# Where the environment does not say otherwise: MLflow's client waits 120 s a request and
# retries 7 times (minutes of backoff), far too long to hold a retrain for a mirror; and it
# prints each run's URL on stdout, which is darkroom's output (the log names the run instead).
ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
PAUSE_SECONDS = 300.0  # after a failure, this process leaves MLflow alone for so long

_paused_until = 0.0
_warned_missing = False


def enabled() -> bool:
    """MLflow is on: ``MLFLOW_TRACKING_URI`` is set, mlflow installed, and no recent failure."""
    global _warned_missing
    if not os.environ.get(URI_ENV) or time.monotonic() < _paused_until:
        return False
    if importlib.util.find_spec("mlflow") is None:
        if not _warned_missing:
            _warned_missing = True
            log.warning(
                "%s is set but mlflow is not installed: nothing is tracked "
                "(pip install 'darkroom[mlflow]')",
                URI_ENV,
            )
        return False
    return True


def guarded(what: str) -> Callable:
    """Runs the function only when MLflow is on; any failure becomes one warning and a pause,
    and the call returns None. ``what`` names the step in the warning."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args, **kwargs) -> Any:
            global _paused_until
            if not enabled():
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # MLflow never fails a darkroom run
                _paused_until = time.monotonic() + PAUSE_SECONDS
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning(
                    "MLflow tracking: %s failed (%s: %s); darkroom goes on without MLflow for "
                    "%.0f s (darkroom's registry is unaffected)",
                    what,
                    type(e).__name__,
                    first[:300],
                    PAUSE_SECONDS,
                )
                return None

        return call

    return wrap


def client() -> MlflowClient:
    """A client for ``MLFLOW_TRACKING_URI`` with darkroom's short timeouts where unset."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    uri = os.environ[URI_ENV]
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get(REGISTRY_ENV) or uri)


def model_name() -> str:
    return os.environ.get(MODEL_ENV) or DEFAULT_NAME


def experiment_id(mlflow: MlflowClient) -> str:
    """The experiment darkroom's runs go to (``MLFLOW_EXPERIMENT_NAME``, default darkroom)."""
    name = os.environ.get(EXPERIMENT_ENV) or DEFAULT_NAME
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow.create_experiment(name)


def model_version_of(mlflow: MlflowClient, version: str) -> ModelVersion | None:
    """The MLflow model version registered for darkroom's ``version`` (None: not registered)."""
    found = mlflow.search_model_versions(
        f"name = '{model_name()}' and tags.`{VERSION_TAG}` = '{version}'"
    )
    return min(found, key=lambda mv: int(mv.version)) if found else None


def point_alias(mlflow: MlflowClient, alias: str, version: str) -> str | None:
    """Points ``alias`` at darkroom ``version``'s model version; removes the alias when that
    version is not in MLflow (trained before tracking was on), so it never names a model that
    is not the one darkroom says. Returns the MLflow model version number, if any."""
    found = model_version_of(mlflow, version)
    if found is not None:
        mlflow.set_registered_model_alias(model_name(), alias, found.version)
        return found.version
    from mlflow.exceptions import MlflowException

    try:
        mlflow.delete_registered_model_alias(model_name(), alias)
    except MlflowException as e:  # no registered model, or no such alias yet: nothing to drop
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    log.info("MLflow: %s is not registered; the %s alias is unset", version, alias)
    return None


@guarded("moving the champion alias")
def champion_changed(version: str) -> str | None:
    """The champion pointer now names ``version``: the ``champion`` alias follows it. Called
    wherever the pointer moves (``darkroom.registry.pointer.promote``: promotions, manual
    promotions, rollbacks), from the CLI and the flows alike."""
    return point_alias(client(), CHAMPION, version)
