"""A person's approval before a promotion (``RetrainConfig.require_approval``): the retrain
stops after the gate's verdict, Paused in the Prefect UI with the decision's figures and a form
(approve or reject, a note), and promotes only what the person approves. Approval never
overrides the gate: a candidate it rejected is not put to anyone."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_run_logger, pause_flow_run
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import Field

from darkroom.config import RetrainConfig
from darkroom.registry import promotion
from darkroom.registry.evaluation import read_metrics
from darkroom.registry.promotion import Approval, Outcome
from darkroom.storage import Storage, open_storage
from tasks.reporting import decision_markdown


class ApprovalTimedOut(RuntimeError):
    """Nobody answered within ``approval_timeout_seconds``: nothing was promoted."""


class Answer(RunInput):
    """The form of a paused retrain."""

    approve: bool = Field(False, description="Promote this candidate.")
    note: str = Field("", description="Why (kept in the promotion record and decision.json).")


def ask_approval(config: RetrainConfig, outcome: Outcome) -> Outcome:
    """With ``require_approval``, asks a person about a candidate the gate accepted and records
    the answer in ``outcome`` and decision.json; else returns ``outcome`` as it is.

    Called in the flow, not as a task: it pauses the flow run. After a timeout the server holds
    the run paused and no task may start, so the answer is written here.

    Raises:
        ApprovalTimedOut: no answer in time; decision.json says so, nothing was promoted.
    """
    if not config.require_approval:
        return outcome
    storage = open_storage(config.storage)
    log = get_run_logger()
    if not outcome.decision.promote:
        log.info("the gate rejected %s: nobody is asked to approve it", outcome.version)
        outcome.approval = Approval(promotion.NOT_ASKED, "the gate rejected it")
        promotion.write_decision(storage, outcome)
        return outcome
    timeout = config.approval_timeout_seconds
    outcome.approval = Approval(promotion.PENDING, timeout_seconds=timeout)
    promotion.write_decision(storage, outcome)
    answer = outcome.approval = wait_for_answer(storage, outcome, timeout)
    if answer.answer == promotion.TIMED_OUT:
        outcome.decision.rule += f"; no answer within {timeout} s: not promoted"
        promotion.write_decision(storage, outcome)
        raise ApprovalTimedOut(
            f"nobody approved or rejected {outcome.version} within {timeout} s "
            "(approval_timeout_seconds): not promoted"
        )
    outcome.decision.rule += f"; {answer.answer} by a person" + (
        f": {answer.note}" if answer.note else ""
    )
    promotion.write_decision(storage, outcome)
    log.info("%s %s: %s", outcome.version, answer.answer, answer.note or "(no note)")
    return outcome


def wait_for_answer(storage: Storage, outcome: Outcome, timeout: int) -> Approval:
    """Pauses the flow run until a person answers in the UI, or ``timeout`` seconds pass."""
    form = Answer.with_initial_data(description=approval_markdown(storage, outcome, timeout))
    try:
        # the server is asked every 10 s (Prefect's default), more often under a short timeout
        answer = pause_flow_run(
            wait_for_input=form, timeout=timeout, poll_interval=min(10, max(1, timeout // 60))
        )
    except FlowPauseTimeout:
        return Approval(promotion.TIMED_OUT, at=_now(), timeout_seconds=timeout)
    verdict = promotion.APPROVED if answer.approve else promotion.REJECTED
    return Approval(verdict, answer.note, _now(), timeout)


def approval_markdown(storage: Storage, outcome: Outcome, timeout: int) -> str:
    """The paused run's description: the question, then the decision's figures."""
    metrics = read_metrics(storage, outcome.version)
    figures = decision_markdown(storage, outcome, metrics.cv if metrics else {})
    champion = outcome.champion_version
    return "\n".join(
        [
            f"# Approve `{outcome.version}` as the champion?",
            "",
            "The gate accepted it. **Approve**: it becomes the champion"
            + (f" (if `{champion}` still is then)" if champion else "")
            + f". **Reject**, or no answer within {timeout / 3600:.3g} h: nothing is promoted. "
            "The note goes into the promotion record and decision.json.",
            "",
            figures.partition("\n")[2],  # below its title, which says "Not promoted" until then
        ]
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()
