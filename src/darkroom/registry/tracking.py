"""A retrain as MLflow sees it (optional: see ``tracking_client``): one run per candidate
version with a nested run per fold, read from the version folder once the candidate is recorded.

The parent run holds the retrain's config as params (flattened: ``train.epochs``), the CV,
holdout and calibration metrics, and as artifacts the plots, decision.json, metrics.json, the
model card and ``model/`` (model.json, config.json, the weights). Each fold's run holds its
history, one step per epoch. The version is registered as a model version whose source is the
run's ``model/`` folder, tagged with darkroom's version id, with the ``challenger`` alias; the
``champion`` alias follows the champion pointer. A rerun for the same version logs no second
run and registers no second model version.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from darkroom import layout
from darkroom.config import TrainConfig
from darkroom.registry import pointer
from darkroom.registry.evaluation import CandidateMetrics, read_metrics
from darkroom.registry.tracking_client import (
    CHALLENGER,
    CHAMPION,
    VERSION_TAG,
    client,
    experiment_id,
    guarded,
    model_name,
    model_version_of,
    point_alias,
)
from darkroom.storage import Storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

ROLE_TAG = "darkroom.role"  # "retrain" on the parent run, "fold" on its children
ARTIFACTS = ("decision.json", "metrics.json", "README.md")  # beside the plots (*.png)
MODEL_FILES = ("model.json", "config.json", "model.safetensors", "README.md")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
BATCH = 100  # params per log_batch request (MLflow's limit)


@guarded("logging the retrain")
def log_retrain(storage: Storage, version: str, config: dict | None = None) -> str | None:
    """Logs candidate ``version`` (recorded: metrics.json and decision.json written) as an MLflow
    run, registers it, and points the aliases. Returns the run id (None when MLflow is off).

    Args:
        config: the retrain's config (``RetrainConfig.model_dump(mode="json")``); without it,
            the training recipe recorded in model.json.
    """
    mlflow = client()
    meta = storage.read_json(layout.version(version, "model.json"))
    exp = experiment_id(mlflow)
    run_id = _finished_run(mlflow, exp, version)
    if run_id is None:
        run_id = _log_run(mlflow, exp, storage, version, meta, config)
    _register(mlflow, version, run_id)
    champion, _ = pointer.read_champion(storage)
    if champion is not None:
        point_alias(mlflow, CHAMPION, champion.version)
    return run_id


def _finished_run(mlflow: MlflowClient, exp: str, version: str) -> str | None:
    """The parent run a finished earlier log of ``version`` left, if any."""
    runs = mlflow.search_runs(
        [exp],
        f"tags.`{VERSION_TAG}` = '{version}' and tags.`{ROLE_TAG}` = 'retrain' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _log_run(
    mlflow: MlflowClient, exp: str, storage: Storage, version: str, meta: dict, config: dict | None
) -> str:
    decision = storage.read_json(layout.version(version, "decision.json"), missing_ok=True) or {}
    tags = {
        VERSION_TAG: version,
        ROLE_TAG: "retrain",
        "darkroom.storage": storage.url(layout.version(version)),
        "darkroom.index_snapshot": str(meta.get("index_snapshot")),
        "darkroom.gate": "promote" if decision.get("promote") else "reject",
    }
    run = mlflow.create_run(exp, run_name=version, tags=tags)
    run_id = run.info.run_id
    params = flatten(config if config is not None else {"train": meta.get("train_config", {})})
    metrics = read_metrics(storage, version) or CandidateMetrics()
    scores = {f"cv/{m}/{k}": v for m, s in metrics.cv.items() for k, v in s.items()}
    scores |= numbers("holdout", metrics.holdout, nested=False)  # no per-class
    scores |= numbers("calibration", meta.get("calibration") or {})
    log_values(mlflow, run_id, params, {k: [(0, v)] for k, v in scores.items()})
    for fold in _fold_records(storage, version, meta):
        _log_fold(mlflow, exp, run_id, version, fold)
    with tempfile.TemporaryDirectory(prefix="darkroom-mlflow-") as tmp:
        mlflow.log_artifacts(run_id, str(_gather(storage, version, meta, Path(tmp))))
    mlflow.set_terminated(run_id, "FINISHED")
    return run_id


def _fold_records(storage: Storage, version: str, meta: dict) -> list[dict]:
    """Every fold.json of the version, the refit's last (folds not found are left out)."""
    k = TrainConfig(**meta["train_config"]).folds if meta.get("train_config") else 0
    keys = [layout.fold(version, f, "fold.json") for f in range(k)]
    if meta.get("final_model") == "refit":
        keys.append(layout.fold(version, k, "fold.json", refit=True))
    found = (storage.read_json(key, missing_ok=True) for key in keys)
    return [r for r in found if r is not None]


def _log_fold(mlflow: MlflowClient, exp: str, parent: str, version: str, record: dict) -> None:
    """One fold as a nested run: its facts as params, each epoch of its history as a step of
    the epoch's metrics, and its best epoch's validation metrics as ``best/<metric>``."""
    name = "refit" if record.get("refit") else f"fold-{record['fold']}"
    tags = {"mlflow.parentRunId": parent, VERSION_TAG: version, ROLE_TAG: "fold"}
    run_id = mlflow.create_run(exp, run_name=name, tags=tags).info.run_id
    facts = ("fold", "refit", "best_epoch", "epochs_run", "stopped_early", "resumed_from_epoch")
    facts += ("batch_size", "grad_accum_steps", "train_images", "val_images", "device")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in record.get("history", []):
        for key, value in numbers("", row, nested=False).items():
            if key not in ("epoch", "frozen_backbone"):
                series.setdefault(key, []).append((int(row["epoch"]), value))
    best = numbers("best", record.get("metrics", {}), nested=False)
    series |= {k: [(0, v)] for k, v in best.items()}
    log_values(mlflow, run_id, {k: record[k] for k in facts if k in record}, series)
    mlflow.set_terminated(run_id, "FINISHED")


def _gather(storage: Storage, version: str, meta: dict, root: Path) -> Path:
    """The version's artifacts in a local folder: plots, records and card at the top, the model
    (weights included, an ensemble's members too) under ``model/``."""
    folder = layout.version(version)
    for info in storage.list(folder):
        name = info.key[len(folder) :]
        if "/" not in name and (name.endswith(".png") or name in ARTIFACTS):
            storage.download(info.key, root / name)
    members = [m["key"] for m in meta.get("ensemble") or []]
    for name in (*MODEL_FILES, *members):
        if storage.exists(layout.version(version, name)):
            storage.download(layout.version(version, name), root / "model" / name)
    return root


def _register(mlflow: MlflowClient, version: str, run_id: str) -> None:
    """``version`` as a model version (once), source: the run's ``model/`` folder; the
    ``challenger`` alias names the newest candidate."""
    from mlflow.exceptions import MlflowException

    name = model_name()
    if model_version_of(mlflow, version) is None:
        try:
            mlflow.create_registered_model(name, description="darkroom's model versions")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{mlflow.get_run(run_id).info.artifact_uri}/model"
        mlflow.create_model_version(
            name, source, run_id=run_id, tags={VERSION_TAG: version}, await_creation_for=10
        )
    found = point_alias(mlflow, CHALLENGER, version)
    log.info("MLflow: %s is run %s, model version %s of %s", version, run_id, found, name)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as one level with dotted keys: ``{"train": {"lr": 1}}`` -> ``train.lr``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def numbers(prefix: str, tree: dict, nested: bool = True) -> dict[str, float]:
    """The numeric leaves of ``tree`` (booleans and None left out), keyed ``prefix/a/b``;
    ``nested=False``: the top level only (nested keys such as class names are no metric names)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict) and nested:
            out |= numbers(name, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def param_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_CHARS]


def log_values(
    mlflow: MlflowClient, run_id: str, params: dict, series: dict[str, list[tuple[int, float]]]
) -> None:
    """Params and metrics (``series``: name -> (step, value) pairs) in batches MLflow takes."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    items = [Param(k, param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), BATCH):
        mlflow.log_batch(run_id, params=items[start : start + BATCH])
    points = [Metric(k, v, now, step) for k, pts in series.items() for step, v in pts]
    for start in range(0, len(points), 10 * BATCH):
        mlflow.log_batch(run_id, metrics=points[start : start + 10 * BATCH])
