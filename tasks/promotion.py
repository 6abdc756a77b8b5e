"""Promotion tasks: measure the candidate against the champion, then record the decision and
move the pointer when the gate says so."""

from __future__ import annotations

from prefect import get_run_logger

from darkroom.config import RetrainConfig
from darkroom.registry import promotion
from darkroom.storage import open_storage
from tasks.retry import io_task


@io_task(task_run_name="evaluate-{version}", retries=2, retry_delay_seconds=10)
def evaluate_candidate(config: RetrainConfig, snapshot: str, version: str) -> promotion.Outcome:
    """The candidate and the champion on the same holdout, and the gate's decision."""
    outcome = promotion.judge(open_storage(config.storage), config, snapshot, version)
    get_run_logger().info("gate: %s", outcome.decision.rule)
    return outcome


@io_task(task_run_name="promote-{outcome.version}")
def promote_candidate(
    config: RetrainConfig, outcome: promotion.Outcome, fold_metrics: list[dict]
) -> tuple[promotion.Outcome, dict]:
    """Writes metrics.json and decision.json, then moves the champion pointer if the decision
    says so. Returns the outcome and the candidate's metrics."""
    storage = open_storage(config.storage)
    metrics = promotion.record_candidate(storage, outcome, fold_metrics)
    return promotion.promote_candidate(storage, outcome), metrics
