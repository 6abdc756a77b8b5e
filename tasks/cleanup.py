"""The cleanup task: plan what the retention rules let go of, delete it when asked, and show
it in the UI (a table of what went, and the report as printed by `darkroom cleanup`)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from darkroom.config import CleanupConfig
from darkroom.registry import cleanup as core
from darkroom.registry.retention import size_text
from darkroom.storage import open_storage
from tasks.retry import io_task


@io_task(name="cleanup")
def run_cleanup(config: CleanupConfig) -> dict:
    """``darkroom.registry.cleanup.cleanup``; a retry deletes what is left (deleting an
    absent key is fine). Returns the totals, not the plan."""
    result = core.cleanup(open_storage(config.storage), config)
    lines = core.report_lines(result)
    for line in lines:
        get_run_logger().info(line)
    rows = [
        {
            "what": what,
            "reason": reason,
            "items": len(items),
            "files": sum(len(ds) for ds in items.values()),
            "size": size_text(sum(d.size for ds in items.values() for d in ds)),
        }
        for (what, reason), items in result.plan.groups().items()
    ]
    verb = "Deleted" if result.applied else "Would delete (dry run)"
    create_table_artifact(rows, key="cleanup", description=f"{verb}: {lines[-1]}")
    create_markdown_artifact(
        "```\n" + "\n".join(lines) + "\n```", key="cleanup-report", description=lines[-1]
    )
    return {
        "applied": result.applied,
        "planned": len(result.plan.deletions),
        "deleted": len(result.deleted),
        "failed": len(result.failed),
        "bytes": result.bytes_freed if result.applied else result.plan.bytes,
        "kept_versions": sorted(result.plan.kept),
    }
