"""Reporting to people and automations: Prefect artifacts for the UI and darkroom's events."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from darkroom import layout
from darkroom.scoring.watch import resource_id
from darkroom.storage import Storage, open_storage

if TYPE_CHECKING:  # torch-heavy modules: a flow's start-up does not load them for hints
    from darkroom.registry.changes import DataChanges
    from darkroom.registry.promotion import Outcome
    from darkroom.training.records import CandidateReport, FoldSummary

PLOTS = ("curves.png", "confusion.png", "reliability.png", "per_class.png", "mistakes.png")
PLOTS += ("label_issues.png",)
LABEL_ISSUE_COLUMNS = ("rank", "key", "given_label", "suggested_label", "self_confidence")
PROMOTED, REJECTED = "darkroom.model.promoted", "darkroom.model.rejected"


@task(name="publish-retrain", cache_policy=NO_CACHE)
def publish_retrain(
    storage_uri: str, outcome: Outcome, folds: list[FoldSummary], candidate: CandidateReport
) -> None:
    """The fold table and the decision as artifacts, and a promoted/rejected event."""
    from darkroom.registry.promotion import METRICS_SHOWN

    storage = open_storage(storage_uri)
    rows = [
        {
            "fold": s.fold,
            "best_epoch": s.best_epoch,
            "val_images": s.val_images,
            **{m: round(s.metrics[m], 4) for m in METRICS_SHOWN if m in s.metrics},
        }
        for s in folds
    ]
    create_table_artifact(
        rows, key="fold-metrics", description=f"Per-fold validation metrics of {outcome.version}"
    )
    create_markdown_artifact(
        decision_markdown(storage, outcome, candidate.cv),
        key="promotion-decision",
        description=f"Promotion decision for {outcome.version}",
    )
    issues = candidate.label_issues
    if issues is not None and issues.top:
        create_table_artifact(
            [{k: r[k] for k in LABEL_ISSUE_COLUMNS} for r in issues.top],
            key="label-issues",
            description=f"{issues.count} of {issues.examined} training labels of "
            f"{outcome.version} look wrong (top {len(issues.top)}; darkroom changed none)",
        )
    _plot_artifacts(storage, outcome.version)
    shown = lambda m: {k: m[k] for k in METRICS_SHOWN} if m else None  # noqa: E731
    emit_event(
        event=PROMOTED if outcome.promoted else REJECTED,
        resource={"prefect.resource.id": resource_id(storage)},
        payload={
            "version": outcome.version,
            "previous": outcome.champion_version,
            "rule": outcome.decision.rule,
            "holdout": shown(outcome.holdout),
            "champion_holdout": shown(outcome.champion_holdout),
        },
    )


def _plot_artifacts(storage: Storage, version: str) -> None:
    """The plots as image artifacts where the browser can fetch them (presigned S3 URLs); a
    local root keeps them as links in the decision's markdown."""
    for name in PLOTS:
        key = layout.version(version, name)
        url = storage.presigned_url(key) if storage.exists(key) else None
        if url:  # artifact keys take lowercase letters, digits and dashes only
            plot = name.removesuffix(".png").replace("_", "-")
            try:  # a plot for people must never fail a run whose model is already decided
                create_image_artifact(url, key=f"plot-{plot}", description=f"{name} of {version}")
            except Exception as e:
                get_run_logger().warning("could not publish %s as an image artifact: %s", name, e)


def _calibration_line(outcome: Outcome) -> str:
    c = outcome.calibration
    if not c:
        return "**Calibration:** none (confidences are the raw softmax)"
    after = c.get("holdout_after") or {}
    before = c.get("holdout_before") or {}
    return (
        f"**Calibration:** temperature {c['temperature']:.3f} ({c['reason']}); holdout ECE "
        f"{before.get('ece', float('nan')):.4f} before, {after.get('ece', float('nan')):.4f} "
        f"with the fitted temperature; fitted on {c.get('fitted_on', 'out-of-fold predictions')}"
    )


def _metrics_table(cv: dict, outcome: Outcome) -> list[str]:
    """Every shown metric side by side, then the primary metric's majority-class baseline."""
    from darkroom.registry.promotion import METRICS_SHOWN

    holdout, champion, d = outcome.holdout, outcome.champion_holdout or {}, outcome.decision
    lines = [
        "| metric | CV mean ± std | holdout (challenger) | holdout (champion) |",
        "|---|---|---|---|",
    ]
    for m in METRICS_SHOWN:
        c = cv.get(m)
        cvs = f"{c['mean']:.4f} ± {c['std']:.4f}" if c else "-"
        old = f"{champion[m]:.4f}" if m in champion else "-"
        lines.append(f"| {m} | {cvs} | {holdout[m]:.4f} | {old} |")
    lines.append(f"| {d.metric}: majority-class baseline | - | {d.baseline:.4f} | - |")
    return lines


def _recall_table(outcome: Outcome) -> list[str]:
    lines = [
        "| class | holdout images | recall (challenger) | recall (champion) |",
        "|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    support = outcome.holdout["per_class_support"]
    for c, r in outcome.decision.per_class_recall.items():
        lines.append(
            f"| {c} | {support.get(c, 0)} | {fmt(r['challenger'])} | {fmt(r['champion'])} |"
        )
    return lines


def _confusion_table(holdout: dict) -> list[str]:
    classes = list(holdout["per_class_support"])
    lines = [
        "Holdout confusion matrix (rows: true, columns: predicted)",
        "",
        "| true \\ predicted | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for c, row in zip(classes, holdout["confusion_matrix"], strict=True):
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
    return lines


def decision_markdown(storage: Storage, outcome: Outcome, cv: dict) -> str:
    """The decision as the UI shows it: rule, significance test (or the first model's
    baseline), metrics side by side, per-class recall, the holdout confusion matrix and links
    to the plots."""
    version = outcome.version
    base = storage.url(layout.version(version))
    plots = [p for p in PLOTS if storage.exists(layout.version(version, p))]
    d = outcome.decision
    gate = (
        f"**Significance:** {d.test} on the paired holdout predictions: p = {d.p_value:.3g} "
        f"(max_p_value {d.max_p_value:g}); b = {d.b} images only the challenger gets right, "
        f"c = {d.c} only the champion"
        if d.test
        else f"**First model:** {d.metric} {d.challenger:.4f} against the majority-class "
        f"baseline {d.baseline:.4f} (baseline_margin {d.baseline_margin:g}, min_metric "
        f"{d.min_metric:g}); no champion to pair with, so no significance test"
    )
    lines = [
        f"# {'Promoted' if outcome.promoted else 'Not promoted'}: `{version}`",
        "",
        f"**Rule:** {outcome.decision.rule}",
        "",
        gate,
        "",
        f"Champion before this run: `{outcome.champion_version or 'none'}`",
        "",
        _calibration_line(outcome),
        "",
        *_metrics_table(cv, outcome),
        "",
        *_recall_table(outcome),
        "",
        *_confusion_table(outcome.holdout),
        "",
        "Plots: " + ", ".join(f"[{p}]({base}{p})" for p in plots),
        "",
        f"Model card: [README.md]({base}README.md)",
        "",
        f"Files: `{base}`",
    ]
    return "\n".join(lines)


@task(name="publish-data-changes", cache_policy=NO_CACHE)
def publish_data_changes(changes: DataChanges) -> None:
    since = changes.since or "(no champion yet)"
    create_table_artifact(
        changes.rows,
        key="data-changes",
        description=f"Labeled images per class in {changes.snapshot} against the champion's "
        f"snapshot {since}: new, removed, relabelled, replaced",
    )


@task(name="publish-scoring", cache_policy=NO_CACHE)
def publish_scoring(summary: dict) -> None:
    create_markdown_artifact(
        scoring_markdown(summary),
        key="scoring-summary",
        description=f"Scoring run with {summary['version']}",
    )


def scoring_markdown(s: dict) -> str:
    lines = [
        f"# Scored with `{s['version']}`",
        "",
        "| incoming | skipped (already scored) | scored | failed | low confidence | not fetched "
        "(next run) |",
        "|---|---|---|---|---|---|",
        f"| {s['incoming']} | {s['already_scored']} | {s['scored']} | {s['failed']} | "
        f"{s['low_confidence']} | {s['unfetched']} |",
        "",
        "| predicted class | images |",
        "|---|---|",
    ]
    lines += [f"| {c} | {n} |" for c, n in s["per_class"].items()]
    return "\n".join(lines) + "\n"
