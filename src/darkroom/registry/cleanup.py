"""``darkroom cleanup``'s entry: survey the root, plan (``retention``), and with ``apply``
delete in batches (``Storage.delete_many``)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from darkroom import layout
from darkroom.config import CleanupConfig
from darkroom.registry import pointer
from darkroom.registry.retention import Plan, RootState, VersionMeta, plan_cleanup, size_text
from darkroom.storage import Storage, lease

log = logging.getLogger(__name__)


@dataclass
class CleanupResult:
    """The plan, and what applying it did (nothing in a dry run).

    Attributes:
        deleted: the keys deleted.
        failed: key -> why it could not be deleted (it stays; the next cleanup tries again).
        bytes_freed: the sizes of the deleted keys, added up.
    """

    plan: Plan
    applied: bool = False
    deleted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes_freed: int = 0


def survey(storage: Storage) -> RootState:
    """What a plan needs of ``storage``: one listing of models/, index/ and reports/, the
    champion, the history, the live leases, and each version's model.json."""
    objects = [
        o for prefix in (layout.MODELS, layout.INDEX, layout.REPORTS) for o in storage.list(prefix)
    ]
    meta = {}
    for o in objects:
        if (v := layout.version_of(o.key)) is not None:
            record = storage.read_json(o.key, missing_ok=True) or {}
            meta[v] = VersionMeta(record.get("created_at"), record.get("index_snapshot"))
    latest = storage.read_json(layout.INDEX_LATEST, missing_ok=True) or {}
    return dataclasses.replace(
        _protections(storage, RootState(objects)),
        meta=meta,
        latest_snapshot=latest.get("snapshot"),
    )


def _protections(storage: Storage, state: RootState) -> RootState:
    """``state`` with the champion, the history and the live leases read now."""
    champion, _ = pointer.read_champion(storage)
    return dataclasses.replace(
        state,
        champion=champion.version if champion else None,
        history=pointer.history(storage),
        leases=lease.live(storage),
    )


def cleanup(storage: Storage, config: CleanupConfig) -> CleanupResult:
    """The plan for ``storage``; with ``config.apply``, carried out.

    Right before deleting, the champion, history and leases are read again, and what became
    protected meanwhile (a promotion, a run that started) is left out of the deletion.
    """
    state = survey(storage)
    plan = plan_cleanup(state, config)
    if not config.apply or not plan.deletions:
        return CleanupResult(plan)
    still = set(plan_cleanup(_protections(storage, state), config).keys)
    spared = [d.key for d in plan.deletions if d.key not in still]
    if spared:
        log.info("%d planned deletions are protected now, left out: %s", len(spared), spared)
    plan = Plan([d for d in plan.deletions if d.key in still], plan.kept)
    failed = storage.delete_many(plan.keys)
    for key, why in failed.items():
        log.warning("could not delete %s: %s", storage.url(key), why)
    deleted = [d for d in plan.deletions if d.key not in failed]
    return CleanupResult(plan, True, [d.key for d in deleted], failed, sum(d.size for d in deleted))


def report_lines(result: CleanupResult, shown: int = 10) -> list[str]:
    """What ``darkroom cleanup`` prints: the deletions grouped by kind and reason (the first
    ``shown`` of each), the versions kept and why, and the bytes freed (or that would be)."""
    out = []
    for (what, reason), items in result.plan.groups().items():
        files = sum(len(ds) for ds in items.values())
        size = sum(d.size for ds in items.values() for d in ds)
        out.append(
            f"{_count(len(items), what)}: {reason} ({_count(files, 'file')}, {size_text(size)})"
        )
        for item, ds in list(items.items())[:shown]:
            out.append(
                f"  {item}  ({_count(len(ds), 'file')}, {size_text(sum(d.size for d in ds))})"
            )
        if len(items) > shown:
            out.append(f"  ... and {len(items) - shown} more")
    out.append(f"kept {_count(len(result.plan.kept), 'version')}:")
    out += [f"  {v}  ({why})" for v, why in sorted(result.plan.kept.items())]
    out += [f"could not delete {key}: {why}" for key, why in result.failed.items()]
    plan = result.plan
    if not result.applied:
        out.append(
            f"dry run, nothing deleted: applying would free {size_text(plan.bytes)} "
            f"({plan.bytes} bytes) in {_count(len(plan.deletions), 'file')}"
        )
    else:
        out.append(
            f"deleted {_count(len(result.deleted), 'file')}, freed {size_text(result.bytes_freed)} "
            f"({result.bytes_freed} bytes)"
        )
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
