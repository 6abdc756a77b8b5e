"""Promotion tasks: measure the candidate against the champion, record the decision, then move
the pointer when the gate (and, where one is asked, a person: tasks.approval) says so."""

from __future__ import annotations

from prefect import get_run_logger

from darkroom.config import RetrainConfig
from darkroom.registry import promotion
from darkroom.registry.evaluation import CandidateMetrics
from darkroom.storage import open_storage
from tasks.retry import io_task


@io_task(task_run_name="evaluate-{version}", retries=2, retry_delay_seconds=10)
def evaluate_candidate(config: RetrainConfig, snapshot: str, version: str) -> promotion.Outcome:
    """The candidate and the champion on the same holdout, and the gate's decision."""
    outcome = promotion.judge(open_storage(config.storage), config, snapshot, version)
    get_run_logger().info("gate: %s", outcome.decision.rule)
    return outcome


@io_task(task_run_name="record-{outcome.version}")
def record_candidate(
    config: RetrainConfig, outcome: promotion.Outcome, fold_metrics: list[dict]
) -> CandidateMetrics:
    """Writes metrics.json, decision.json and the model card of the candidate."""
    return promotion.record_candidate(open_storage(config.storage), outcome, fold_metrics)


@io_task(task_run_name="promote-{outcome.version}")
def promote_candidate(config: RetrainConfig, outcome: promotion.Outcome) -> promotion.Outcome:
    """Moves the champion pointer to the candidate if the decision says so."""
    return promotion.promote_candidate(open_storage(config.storage), outcome)
