"""Ask people for labels: write a Label Studio import file of the incoming images the champion
is least sure of, spread over what arrived, plus a random share.

Deployed without a schedule (deployments/prefect.yaml): run it by hand from the UI's form, or
from an automation on drift. Runs as a plain script too: `python flows/label_queue.py`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from darkroom.config import LabelQueueConfig
from darkroom.config.labeling import LABEL_QUEUE_TIMEOUT_SECONDS
from darkroom.monitoring.labeling import QueueResult
from tasks.labeling import build_label_queue
from tasks.naming import flow_options


@flow(**flow_options("label-queue", "label-queue", LABEL_QUEUE_TIMEOUT_SECONDS))
def label_queue(config: LabelQueueConfig = LabelQueueConfig()) -> QueueResult:
    """Writes ``reports/label_queue/<time>.json`` (import it into a Label Studio project made
    with the ``.xml`` beside it), and a ``.csv`` of the same images."""
    result = build_label_queue(config)
    logger = get_run_logger()
    if not result.queued:
        logger.info("nothing to queue: no scored incoming image of %s waits", result.version)
        return result
    reasons = ", ".join(f"{n} {r}" for r, n in result.by_reason.items())
    logger.info("queued %d images of %s (%s)", result.queued, result.version, reasons)
    create_markdown_artifact(
        summary_markdown(result), key="label-queue", description="The labeling queue written"
    )
    return result


def summary_markdown(r: QueueResult) -> str:
    """The queue's files and counts, for the run's page in the UI."""
    lines = [
        f"Queued **{r.queued}** of {r.candidates} scored images of `{r.version}`; left out "
        f"{r.already_labeled} already labeled and {r.already_queued} in a queue still open.",
        "",
        "| picked as | images |",
        "| --- | --- |",
        *(f"| {reason} | {n} |" for reason, n in r.by_reason.items()),
        "",
        f"- Label Studio import file: `{r.files['json']}`",
        f"- labeling config: `{r.files['xml']}`",
        f"- table: `{r.files['csv']}`",
    ]
    if not r.diversity:
        lines.append("- diversity off: the predictions hold no embeddings")
    if r.expires_at:
        lines.append(
            f"- image links expire at {r.expires_at} (or with the credentials that signed them)"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(label_queue())
