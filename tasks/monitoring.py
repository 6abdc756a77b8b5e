"""Watching the champion: the reference a retrain keeps with each version, and the drift report
of each scoring run (artifacts for the UI, and ``darkroom.drift.detected`` for automations)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.events import emit_event
from prefect.runtime import flow_run

from darkroom import layout
from darkroom.config import RetrainConfig, ScoreConfig
from darkroom.scoring.watch import resource_id
from darkroom.storage import open_storage
from tasks.gpus import gpu_slot
from tasks.retry import io_task

DRIFT_DETECTED = "darkroom.drift.detected"
# A label of the event's resource, so that a trigger can tell the two cases apart: "true" when
# labeled images were added since the champion's snapshot (an early retrain can use them),
# "false" when none were (people must label first: a labeling queue).
LABELS_ADDED = "darkroom.labels-added"
FIGURES = ("unfamiliar_share", "expected_accuracy", "range_low", "range_high", "headline")
FIGURES += ("js_distance", "chi2_p", "ks_statistic", "ks_p", "mmd2", "mmd_p")


@io_task(name="keep-reference", retries=2, retry_delay_seconds=10)
def keep_reference(config: RetrainConfig, snapshot: str, version: str) -> dict:
    """Embeds a bounded sample of the candidate's training and holdout images and keeps the
    reference its scoring runs are compared with (``models/<version>/reference.npz``)."""
    from darkroom.monitoring.keeping import keep_reference as keep

    storage = open_storage(config.storage)
    with gpu_slot(config.device) as dev:
        summary = keep(storage, config.model_copy(update={"device": dev}), snapshot, version)
    get_run_logger().info(
        "reference kept for %s: %d training and %d holdout images embedded, %d dims, "
        "unfamiliar past distance %.3f, %.0f KB",
        version,
        summary.train_images,
        summary.holdout_images,
        summary.dims,
        summary.knn_threshold,
        summary.bytes / 1024,
    )
    return {"url": summary.url, "bytes": summary.bytes, "knn_threshold": summary.knn_threshold}


@io_task(name="check-drift", retries=2, retry_delay_seconds=10)
def check_drift(config: ScoreConfig, version: str, files: list[str]) -> dict | None:
    """The run's drift report against the champion's reference: written under
    ``reports/drift/``, shown as a table and a markdown artifact, and, when the batch has
    drifted, the ``darkroom.drift.detected`` event with its figures."""
    from darkroom.monitoring.report import run_drift

    storage = open_storage(config.storage)
    run = flow_run.get_name() or "run"
    drift = run_drift(storage, config, version, files, run)
    log = get_run_logger()
    if drift is None:
        log.info("no drift report: %s keeps no reference, or nothing was scored", version)
        return None
    r = drift.report
    log.info(
        "drift of %d images against %s: %s%s; %.1f%% unfamiliar, expected accuracy %s",
        r.n_images,
        version,
        r.verdict,
        f" ({'; '.join(r.reasons)})" if r.reasons else "",
        100 * r.unfamiliar_share,
        _range(r),
    )
    _artifacts(drift)
    _plot_artifact(storage, drift)
    if r.drifted:
        _emit(storage, drift)
    return {"verdict": r.verdict, "url": drift.url, **{k: getattr(r, k) for k in FIGURES}}


def _range(r) -> str:
    if r.expected_accuracy is None:
        return "unknown (every image unfamiliar)"
    return f"{r.expected_accuracy:.3f} on familiar images, {r.range_low:.3f} to {r.range_high:.3f}"


def _artifacts(drift) -> None:
    r = drift.report
    rows = [{"figure": k, "value": _shown(getattr(r, k))} for k in FIGURES]
    rows.append({"figure": "images", "value": str(r.n_images)})
    create_table_artifact(
        rows, key="drift", description=f"Drift against {drift.version}: {r.verdict}"
    )
    reasons = "\n".join(f"- {why}" for why in r.reasons) or "- nothing crossed a threshold"
    create_markdown_artifact(
        f"# Drift: {r.verdict}\n\n{r.n_images} images scored with `{drift.version}`; expected "
        f"accuracy {_range(r)}.\n\n{reasons}\n\n"
        f"Report: [{drift.url}]({drift.url}) · plot: [{drift.plot}]({drift.plot})\n",
        key="drift-report",
        description=f"Drift of this scoring run against {drift.version}",
    )


def _plot_artifact(storage, drift) -> None:
    """The plot as an image artifact where the browser can fetch it (a presigned S3 URL); a
    local root keeps it as the link in the markdown artifact."""
    url = storage.presigned_url(layout.drift_report(drift.version, drift.run, "png"))
    if url:
        try:  # a picture for people must never fail a scoring run
            create_image_artifact(
                url, key="drift-plot", description=f"Drift against {drift.version}"
            )
        except Exception as e:
            get_run_logger().warning("could not publish the drift plot: %s", e)


def _shown(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _emit(storage, drift) -> None:
    added = drift.labels_added
    emit_event(
        event=DRIFT_DETECTED,
        resource={
            "prefect.resource.id": resource_id(storage),
            LABELS_ADDED: "true" if added else "false",
        },
        payload={
            "version": drift.version,
            "run": drift.run,
            "verdict": drift.report.verdict,
            "reasons": drift.report.reasons,
            "images": drift.report.n_images,
            "labels_added": added,
            "report": drift.url,
            **{k: getattr(drift.report, k) for k in FIGURES},
        },
    )
