"""An operator's decisions about the champion as tasks: promote a named version, roll back.
Each leaves a markdown artifact saying what changed (or why nothing did). Not retried: a
refused or lost decision is the operator's to make again."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from darkroom import layout
from darkroom.config import PromoteVersionConfig, RollbackConfig
from darkroom.registry import pointer
from darkroom.registry.manual import Change, GateRejected, promote_version
from darkroom.storage import Storage, open_storage

ARTIFACT = "champion-change"


@task(name="promote-version", cache_policy=NO_CACHE)
def promote_named(config: PromoteVersionConfig) -> Change:
    """``config.version`` becomes the champion, through the gate unless ``config.force``."""
    storage = open_storage(config.storage)
    try:
        change = promote_version(
            storage,
            config.retrain_config(),
            config.version,
            force=config.force,
            reason=config.reason,
        )
    except GateRejected as e:
        refused = f"**Gate:** {e.rule}\n\nNothing changed; `force` promotes it anyway."
        publish(f"# Not promoted: `{config.version}`\n\n{refused}", config.version)
        raise
    if change.record is None:
        publish(f"# No change: `{change.champion}` is the champion already", change.champion)
    else:
        publish(change_markdown(storage, change.record, change.rule), change.champion)
    return change


@task(name="rollback", cache_policy=NO_CACHE)
def roll_back(config: RollbackConfig) -> pointer.Champion:
    """The champion returns to the previous one, or to ``config.to_version``."""
    storage = open_storage(config.storage)
    record = pointer.rollback(storage, config.to_version, config.reason)
    publish(change_markdown(storage, record), record.version)
    return record


def publish(markdown: str, version: str) -> None:
    get_run_logger().info("%s", markdown.partition("\n")[0].removeprefix("# "))
    create_markdown_artifact(markdown, key=ARTIFACT, description=f"Champion change: {version}")


def change_markdown(storage: Storage, record: pointer.Champion, rule: str = "") -> str:
    """What moved: the champion before and after, the record's action and reason, the new
    champion's holdout metrics and where the record is."""
    lines = [
        f"# Champion: `{record.version}` (was `{record.previous or 'none'}`)",
        "",
        f"**{record.action}** at {record.at}",
        "",
        f"**Reason:** {record.reason}",
        "",
        *([f"**Gate:** {rule}", ""] if rule else []),
        "| metric | holdout |",
        "|---|---|",
        *(f"| {m} | {v:.4f} |" for m, v in record.metrics.items()),
        "",
        f"Pointer: `{storage.url(layout.CHAMPION)}`; history: "
        f"`{storage.url(layout.PROMOTIONS)}` (`darkroom history`)",
    ]
    return "\n".join(lines)
