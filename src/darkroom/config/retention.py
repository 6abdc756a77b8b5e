"""The parameters of the cleanup flow (``darkroom cleanup``): what a storage root keeps of its
model versions, index snapshots and reports. The user's images, the labels files and the
predictions are never deleted, whatever these say."""

from __future__ import annotations

from pydantic import Field

from darkroom.config.runtime import StorageConfig

CLEANUP_TIMEOUT_SECONDS = 3600


class CleanupConfig(StorageConfig):
    """Parameters of the ``cleanup`` flow (dry run unless ``apply``)."""

    keep_versions: int = Field(
        10,
        ge=1,
        description="Model versions kept however they ended (the most recent by creation "
        "time); older rejected and superseded versions are deleted. The champion, the versions "
        "of the last keep_promotions promotion records and the versions a running retrain or "
        "scoring run holds are kept beyond this.",
    )
    keep_promotions: int = Field(
        3,
        ge=0,
        description="The versions named in this many of the newest promotion and rollback "
        "records (each record's version and the one it replaced) are kept: rollbacks go to them.",
    )
    keep_report_days: int = Field(
        90,
        ge=1,
        description="Reports under reports/ older than this many days are deleted (the "
        "watcher's state and the label-issue reports of kept versions stay).",
    )
    apply: bool = Field(
        False,
        description="Delete what the plan lists. Off: a dry run that only prints the plan.",
    )
