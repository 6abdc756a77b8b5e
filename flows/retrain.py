"""Nightly retraining: sync labeled → rebuild index → K folds → best fold → holdout gate →
promote. Run it as a script, from the CLI (`darkroom retrain`) or from a deployment."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from darkroom import registry
from darkroom.config import RetrainConfig, cache_dir_for
from darkroom.evaluation import record_candidate
from darkroom.index import DatasetError
from darkroom.storage import open_storage
from tasks.common import run_name, visible_gpus
from tasks.ingest import rebuild_index, sync_labeled
from tasks.training import evaluate_holdout, finalize_candidate, train_fold

METRICS_SHOWN = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "log_loss")
PLOTS = ("curves.png", "confusion.png", "per_class.png", "mistakes.png")


@flow(name="nightly-retrain", flow_run_name=run_name("retrain"), log_prints=True)
def nightly_retrain(config: RetrainConfig | None = None) -> dict:
    """Retrains on the current labeled data and promotes the result only if it beats the
    champion on the same holdout."""
    config = config or RetrainConfig()
    cfg = config.train
    logger = get_run_logger()
    storage = open_storage(config.storage)
    cache = str(cache_dir_for(config))
    run_name = flow_run.get_name() or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")

    synced = sync_labeled(storage.uri, cache, config.download_concurrency)
    index = rebuild_index(
        storage.uri, cache, cfg.folds, cfg.seed, config.holdout_fraction, run_name
    )
    snapshot = index["snapshot"]
    if index["summary"]["holdout"] == 0:  # fail before training, not after
        raise DatasetError("the holdout is empty: add labeled images or raise holdout_fraction")
    version = registry.new_version(snapshot, cfg.fingerprint())
    champion, champion_etag = registry.read_champion(storage)
    if champion and champion["version"] == version and not config.force:
        logger.info(
            "labeled data and config unchanged since champion %s: nothing to train "
            "(use force to retrain anyway)",
            version,
        )
        return {"skipped": True, "version": version, "sync": synced, "index": index}
    if config.force:
        # A new version per flow run: a retry of this run still finds the folds it trained.
        run_id = flow_run.get_id()
        version = f"{version}-{run_id[:8] if run_id else f'{datetime.now(UTC):%Y%m%dT%H%M%S}'}"

    fold_args = (version, cfg, config.device, config.num_workers)
    if visible_gpus(config.device) > 1:  # one fold per GPU at a time: the darkroom-gpu limit
        futures = [
            train_fold.submit(storage.uri, cache, snapshot, k, *fold_args) for k in range(cfg.folds)
        ]
        summaries = [f.result() for f in futures]
    else:
        summaries = [
            train_fold(storage.uri, cache, snapshot, k, *fold_args) for k in range(cfg.folds)
        ]
    if cfg.final_model == "refit":  # "fold" number cfg.folds: every train row, no validation
        train_fold(storage.uri, cache, snapshot, cfg.folds, *fold_args)
    finalize_candidate(storage.uri, version, snapshot, summaries, cfg)
    holdout = evaluate_holdout(storage.uri, cache, snapshot, version, config.device, config.tta)
    champion_holdout = None
    if champion:
        champion_holdout = evaluate_holdout(
            storage.uri, cache, snapshot, champion["version"], config.device, config.tta
        )
    decision = registry.decide(
        holdout, champion_holdout, cfg.metric, config.min_delta, config.max_class_recall_drop
    )
    metrics = record_candidate(storage.uri, version, summaries, holdout, champion_holdout, decision)
    promoted = False
    if decision["promote"]:
        try:
            registry.promote(
                storage,
                version,
                expected_etag=champion_etag,
                action="promote",
                reason=decision["rule"],
                previous=champion and champion["version"],
                metrics={m: holdout[m] for m in METRICS_SHOWN},
            )
            promoted = True
        except registry.PromotionLost as e:
            logger.warning("%s", e)
            decision = {**decision, "rule": f"{decision['rule']}; lost the race: {e}"}
    _publish(storage, version, summaries, metrics, decision, promoted, champion)
    return {
        "skipped": False,
        "version": version,
        "promoted": promoted,
        "decision": decision,
        "cv": metrics["cv"],
        "holdout": {m: holdout[m] for m in METRICS_SHOWN},
        "sync": synced,
        "index": index,
    }


def _publish(storage, version, summaries, metrics, decision, promoted, champion) -> None:
    """Artifacts for the UI and an event for automations."""
    rows = [
        {
            "fold": s["fold"],
            "best_epoch": s["best_epoch"],
            "val_images": s["val_images"],
            **{m: round(s["metrics"][m], 4) for m in METRICS_SHOWN},
        }
        for s in summaries
    ]
    create_table_artifact(
        rows, key="fold-metrics", description=f"Per-fold validation metrics of {version}"
    )
    create_markdown_artifact(
        decision_markdown(storage, version, metrics, decision, promoted, champion),
        key="promotion-decision",
        description=f"Promotion decision for {version}",
    )
    emit_event(
        event="darkroom.model.promoted" if promoted else "darkroom.model.rejected",
        resource={"prefect.resource.id": f"darkroom.storage.{storage.uri}"},
        payload={
            "version": version,
            "previous": champion and champion["version"],
            "rule": decision["rule"],
            "holdout": {m: metrics["holdout"][m] for m in METRICS_SHOWN},
            "champion_holdout": {m: decision["champion_holdout"][m] for m in METRICS_SHOWN}
            if decision.get("champion_holdout")
            else None,
        },
    )


def decision_markdown(storage, version, metrics, decision, promoted, champion) -> str:
    """The decision as the UI shows it: rule, metrics side by side, per-class recall, the
    holdout confusion matrix and links to the plots."""
    cv, holdout = metrics["cv"], metrics["holdout"]
    champ = decision.get("champion_holdout") or {}
    lines = [
        f"# {'Promoted' if promoted else 'Not promoted'}: `{version}`",
        "",
        f"**Rule:** {decision['rule']}",
        "",
        f"Champion before this run: `{champion['version'] if champion else 'none'}`",
        "",
        "| metric | CV mean ± std | holdout (challenger) | holdout (champion) |",
        "|---|---|---|---|",
    ]
    for m in METRICS_SHOWN:
        c = cv.get(m)
        cvs = f"{c['mean']:.4f} ± {c['std']:.4f}" if c else "-"
        old = f"{champ[m]:.4f}" if m in champ else "-"
        lines.append(f"| {m} | {cvs} | {holdout[m]:.4f} | {old} |")
    lines += [
        "",
        "| class | holdout images | recall (challenger) | recall (champion) |",
        "|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c, r in decision.get("per_class_recall", {}).items():
        n = holdout["per_class_support"].get(c, 0)
        lines.append(f"| {c} | {n} | {fmt(r['challenger'])} | {fmt(r['champion'])} |")
    classes = list(holdout["per_class_support"])
    lines += [
        "",
        "Holdout confusion matrix (rows: true, columns: predicted)",
        "",
        "| true \\ predicted | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for c, row in zip(classes, holdout["confusion_matrix"], strict=True):
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
    base = storage.url(registry.version_key(version))
    lines += [
        "",
        "Plots: "
        + ", ".join(
            f"[{p}]({base}{p})" for p in PLOTS if storage.exists(registry.version_key(version, p))
        ),
        "",
        f"Files: `{base}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(nightly_retrain())
