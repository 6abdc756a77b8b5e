"""Nightly retraining: sync labeled → rebuild index → K folds → finalise the candidate →
evaluate it against the champion → promote if the gate says so → publish. Run it as a script,
from the CLI (`darkroom retrain`) or from a deployment."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from darkroom.config import RETRAIN_TIMEOUT_SECONDS, RetrainConfig
from darkroom.data.index import IndexResult
from darkroom.data.labels import DatasetError
from darkroom.registry import pointer
from darkroom.registry.promotion import METRICS_SHOWN
from darkroom.storage import lease, open_storage
from darkroom.training.records import FoldSummary
from tasks.approval import ask_approval
from tasks.gpus import ensure_gpu_limit, visible_gpus
from tasks.index import data_changes, rebuild_index
from tasks.monitoring import keep_reference
from tasks.naming import flow_options
from tasks.promotion import evaluate_candidate, promote_candidate, record_candidate
from tasks.reporting import publish_data_changes, publish_retrain
from tasks.runners import (
    fold_resources,
    folds_in_flight,
    for_workers,
    running,
    submit_bounded,
)
from tasks.sync import sync_labeled
from tasks.tracking import track_retrain
from tasks.train import check_pretrained, choose_lr, finalize_candidate, train_fold


@flow(**flow_options("nightly-retrain", "retrain", RETRAIN_TIMEOUT_SECONDS))
def nightly_retrain(config: RetrainConfig = RetrainConfig()) -> dict:
    """Retrains on the current labeled data and promotes the result only if it beats the
    champion on the same holdout. One retrain per storage root at a time (a lease)."""
    with lease.held(open_storage(config.storage), "retrain", config.lease_seconds) as held:
        return _retrain(config, held)


def _retrain(config: RetrainConfig, held: lease.Lease) -> dict:
    check_pretrained(config)
    synced = sync_labeled(config)
    index = rebuild_index(config, _run_label())
    changes = data_changes(config, index.snapshot)
    publish_data_changes(changes)
    result = {"sync": asdict(synced), "index": asdict(index), "changes": changes.total}
    version = candidate_version(config, index)
    if version is None:
        return {**result, "skipped": True, "version": _version_of(config, index)}
    held.hold(version)  # the lease names it: darkroom cleanup keeps it while this runs
    choose_lr(config, index.snapshot, version)
    folds = train_folds(config, index.snapshot, version)
    candidate = finalize_candidate(config, index.snapshot, version, folds)
    outcome = evaluate_candidate(config, index.snapshot, version)
    keep_reference(config, index.snapshot, version)  # what its scoring runs are compared with
    record_candidate(config, outcome, [f.metrics for f in folds])
    outcome = promote_candidate(config, ask_approval(config, outcome))  # a person first?
    publish_retrain(config.storage, outcome, folds, candidate)
    track_retrain(config, version)  # MLflow, when MLFLOW_TRACKING_URI is set
    return {
        **result,
        "skipped": False,
        "version": version,
        "promoted": outcome.promoted,
        "decision": asdict(outcome.decision),
        "cv": candidate.cv,
        "holdout": {m: outcome.holdout[m] for m in METRICS_SHOWN},
    }


def _run_label() -> str:
    """The flow run's name (it names the quarantine report), or the UTC time outside one."""
    return flow_run.get_name() or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _version_of(config: RetrainConfig, index: IndexResult) -> str:
    return pointer.new_version(index.snapshot, config.train.fingerprint())


def candidate_version(config: RetrainConfig, index: IndexResult) -> str | None:
    """The version to train, or None when data and config are the champion's already.

    The version is a function of snapshot and config, so a retried run finds the folds it
    trained; with ``force``, each flow run trains a version of its own.
    """
    if index.summary.holdout == 0:  # fail before training, not after
        raise DatasetError("the holdout is empty: add labeled images or raise holdout_fraction")
    version = _version_of(config, index)
    champion, _ = pointer.read_champion(open_storage(config.storage))
    if not config.force:
        if champion and champion.version == version:
            get_run_logger().info(
                "labeled data and config unchanged since champion %s: nothing to train "
                "(use force to retrain anyway)",
                version,
            )
            return None
        return version
    run_id = flow_run.get_id()
    return f"{version}-{run_id[:8] if run_id else f'{datetime.now(UTC):%Y%m%dT%H%M%S}'}"


def train_folds(config: RetrainConfig, snapshot: str, version: str) -> list[FoldSummary]:
    """Every fold, then the refit when ``final_model="refit"`` (fold number K: every train
    row, no validation), through the configured task runner: at most ``folds_in_flight`` at
    once, each on a GPU of its own where there are GPUs (Ray: one GPU per fold; threads: a
    slot of the ``darkroom-gpu`` limit and a GPU lock)."""
    k, limit = config.train.folds, folds_in_flight(config)
    train = train_fold.with_options(timeout_seconds=config.fold_timeout_seconds)
    refs = {"config": for_workers(config), "snapshot": snapshot, "version": version}
    if config.task_runner == "threads" and visible_gpus(config.device):
        # sized from config (one slot per GPU), unless the operator made one
        ensure_gpu_limit(limit * config.devices_per_fold)
    with running(config) as runner:
        resources = fold_resources(config)

        def run(numbers: range) -> list[FoldSummary]:
            calls = ({**refs, "fold": f} for f in numbers)
            done = submit_bounded(runner, train, calls, limit, resources)
            return sorted((f.result() for f in done), key=lambda s: s.fold)

        folds = run(range(k))
        if config.train.final_model == "refit":
            run(range(k, k + 1))
    return folds


def brief(r: dict) -> dict:
    """What `darkroom retrain` prints of a run's result."""
    shown = ("listed", "new", "changed", "removed", "unchanged", "refused")
    out = {
        "version": r["version"],
        "skipped": r["skipped"],
        "sync": {k: r["sync"][k] for k in shown},
        "index": r["index"]["summary"],
    }
    if not r["skipped"]:
        out.update(
            promoted=r["promoted"],
            rule=r["decision"]["rule"],
            cv_accuracy=r["cv"]["accuracy"],
            holdout=r["holdout"],
        )
    return out


if __name__ == "__main__":
    print(nightly_retrain())
