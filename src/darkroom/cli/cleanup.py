"""``darkroom cleanup``: what the retention rules let go of (a dry run unless --apply)."""

from __future__ import annotations

from darkroom.cli.commands import command
from darkroom.cli.flags import config_from_args
from darkroom.config import CleanupConfig
from darkroom.storage import open_storage


@command(
    "cleanup",
    "delete old model versions, fold checkpoints, index snapshots and reports "
    "(a dry run unless --apply)",
    (CleanupConfig,),
    config_file=True,
)
def cmd_cleanup(a) -> int:
    """Prints the plan grouped by kind and reason, and the bytes it frees; 1 when some key
    could not be deleted (the next cleanup tries it again)."""
    from darkroom.registry.cleanup import cleanup, report_lines

    config = config_from_args(CleanupConfig, a)
    storage = open_storage(config.storage)
    storage.check()
    result = cleanup(storage, config)
    print("\n".join(report_lines(result)))
    return 1 if result.failed else 0
