"""Retention: what a storage root can do without, and why (``darkroom cleanup``).

``plan_cleanup`` is pure: from what ``darkroom.registry.cleanup.survey`` read of the root (the
listing of models/, index/ and reports/, the champion, the promotion history, the live leases)
it returns the deletions with their reasons and sizes. It only ever names keys in a version's
folder, index snapshots and reports: the user's images and labels files, the predictions, the
scoring ledger, the champion pointer, the promotion log and the leases are not in its reach.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from darkroom import layout
from darkroom.config import CleanupConfig
from darkroom.registry.pointer import Champion, lineage
from darkroom.storage import ObjectInfo
from darkroom.storage.lease import Holding

UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


@dataclass(frozen=True)
class VersionMeta:
    """What a plan needs of a version's model.json."""

    created_at: str | None = None
    index_snapshot: str | None = None


@dataclass(frozen=True)
class RootState:
    """What a plan is made from.

    Attributes:
        objects: the listing of models/, index/ and reports/ (other keys are ignored).
        champion: the champion's version (None: no champion yet).
        history: the promotion and rollback records, oldest first.
        leases: the leases live runs hold (``darkroom.storage.lease.live``).
        meta: per version with a model.json, what the plan needs of it.
        latest_snapshot: the snapshot index/latest.json points at.
        now: when the plan is made (reports' ages count from it).
    """

    objects: list[ObjectInfo]
    champion: str | None = None
    history: list[Champion] = field(default_factory=list)
    leases: list[Holding] = field(default_factory=list)
    meta: dict[str, VersionMeta] = field(default_factory=dict)
    latest_snapshot: str | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Deletion:
    """One object to delete. ``what``: version, fold checkpoint, index snapshot or report;
    ``item``: the version, fold folder, snapshot or report it belongs to."""

    key: str
    size: int
    what: str
    item: str
    reason: str


@dataclass
class Plan:
    """The deletions, and why each version that stays is kept."""

    deletions: list[Deletion]
    kept: dict[str, str]

    @property
    def bytes(self) -> int:
        return sum(d.size for d in self.deletions)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.deletions]

    def groups(self) -> dict[tuple[str, str], dict[str, list[Deletion]]]:
        """(what, reason) -> item -> its deletions: what the CLI and the flow print."""
        out: dict[tuple[str, str], dict[str, list[Deletion]]] = {}
        for d in self.deletions:
            out.setdefault((d.what, d.reason), {}).setdefault(d.item, []).append(d)
        return out


def size_text(n: int) -> str:
    """``n`` bytes for people: 0 B, 512 B, 1.5 KB, 257.3 MB (powers of 1000, as disks count)."""
    size, unit = float(n), 0
    while size >= 1000 and unit < len(UNITS) - 1:
        size, unit = size / 1000, unit + 1
    return f"{int(size)} B" if unit == 0 else f"{size:.1f} {UNITS[unit]}"


def plan_cleanup(state: RootState, config: CleanupConfig) -> Plan:
    """What ``config`` lets go of in ``state``, and why; deletes nothing."""
    folders = _version_folders(state.objects)
    kept = kept_versions(state, config, folders)
    deletions = [
        *_versions(state, folders, kept, config.keep_versions),
        *_checkpoints(state, folders, kept),
        *_snapshots(state, kept),
        *_reports(state, folders, kept, config.keep_report_days),
    ]
    for d in deletions:  # what the rules above build; a guard against a rule gone wrong
        if layout.version_folder_of(d.key) is None and not d.key.startswith(
            (layout.INDEX, layout.REPORTS)
        ):
            raise ValueError(f"cleanup planned {d.key!r}, outside what it may delete")
    return Plan(deletions, kept)


def _version_folders(objects: list[ObjectInfo]) -> dict[str, list[ObjectInfo]]:
    folders: dict[str, list[ObjectInfo]] = defaultdict(list)
    for o in objects:
        if (v := layout.version_folder_of(o.key)) is not None:
            folders[v].append(o)
    return dict(folders)


def held_versions(leases: list[Holding]) -> dict[str, str]:
    """version -> the lease (retrain, score) of the live run that works with it."""
    return {h.version: h.name for h in leases if h.version}


def kept_versions(
    state: RootState, config: CleanupConfig, folders: dict[str, list[ObjectInfo]]
) -> dict[str, str]:
    """version -> why it stays; the first reason that holds is given."""
    kept: dict[str, str] = {}

    def keep(version: str | None, why: str) -> None:
        if version in folders:
            kept.setdefault(version, why)

    keep(state.champion, "the champion")
    for version, name in held_versions(state.leases).items():
        keep(version, f"held by a running {name} run")
    recent = state.history[-config.keep_promotions :] if config.keep_promotions else []
    for r in recent:
        why = f"named in the last {config.keep_promotions} promotion records"
        keep(r.version, why)
        keep(r.previous, why)
    chain = lineage(state.history)
    if len(chain) >= 2:
        keep(chain[-2], "where a rollback goes")
    if _retrain_unnamed(state.leases):
        for v in folders:
            if v not in state.meta:
                keep(v, "unfinished while a retrain runs")
    newest = sorted(folders, key=lambda v: _created(state, v, folders[v]), reverse=True)
    for v in newest[: config.keep_versions]:
        keep(v, f"one of the {config.keep_versions} most recent versions")
    return kept


def _retrain_unnamed(leases: list[Holding]) -> bool:
    """A running retrain has not named its version yet (or is an older darkroom's)."""
    return any(h.name == "retrain" and not h.version for h in leases)


def _created(state: RootState, version: str, files: list[ObjectInfo]) -> datetime:
    """model.json's created_at, else the newest file of the folder."""
    created = state.meta[version].created_at if version in state.meta else None
    if created:
        at = datetime.fromisoformat(created)
        return at if at.tzinfo else at.replace(tzinfo=UTC)
    return max(o.last_modified for o in files)


def _versions(state, folders, kept, keep_versions: int) -> list[Deletion]:
    """Every file of each version that is not kept, and its label-issue report."""
    champions = {r.version for r in state.history}
    reports = {layout.label_issues_version(o.key): o for o in state.objects}
    out = []
    for v, files in sorted(folders.items()):
        if v in kept:
            continue
        names = {o.key for o in files}
        if v in champions:
            status = "superseded (a former champion)"
        elif layout.version(v, "model.json") not in names:
            status = "unfinished"
        else:
            status = "never promoted"
        reason = f"{status}, older than the {keep_versions} most recent"
        report = [reports[v]] if v in reports else []
        out += [Deletion(o.key, o.size, "version", v, reason) for o in [*files, *report]]
    return out


def _checkpoints(state, folders, kept) -> list[Deletion]:
    """The resume checkpoints of finished folds (fold.json written) of the kept versions that
    no run holds (a finished fold removes its own; one is left when a run stopped between)."""
    held = held_versions(state.leases)
    out = []
    for v in sorted(set(kept) - set(held)):
        names = {o.key for o in folders[v]}
        for o in folders[v]:
            folder = layout.fold_folder_of(o.key)
            if (
                folder
                and o.key == folder + layout.FOLD_CHECKPOINT
                and folder + layout.FOLD_RECORD in names
            ):
                reason = "resume state of a finished fold"
                out.append(Deletion(o.key, o.size, "fold checkpoint", folder, reason))
    return out


def _snapshots(state: RootState, kept: dict[str, str]) -> list[Deletion]:
    """Index snapshots that neither index/latest.json nor a kept version names. None while a
    retrain runs: it writes its snapshot before index/latest.json points at it."""
    if any(h.name == "retrain" for h in state.leases):
        return []
    named = {state.latest_snapshot} | {
        state.meta[v].index_snapshot for v in kept if v in state.meta
    }
    # an unfinished version's id starts with its snapshot's (registry.pointer.new_version)
    prefixes = tuple(v.split("-")[0] for v in kept if v not in state.meta)
    out = []
    for o in state.objects:
        snap = layout.snapshot_of(o.key)
        if snap is None or snap in named or (prefixes and snap.startswith(prefixes)):
            continue
        reason = "no kept version was trained on it"
        out.append(Deletion(o.key, o.size, "index snapshot", snap, reason))
    return out


def _reports(state, folders, kept, days: int) -> list[Deletion]:
    """Reports older than ``days``, except the watcher's state and the label-issue reports
    of versions that stay (those of deleted versions go with them)."""
    cutoff = state.now - timedelta(days=days)
    out = []
    for o in state.objects:
        if not o.key.startswith(layout.REPORTS) or o.key == layout.WATCH_STATE:
            continue
        version = layout.label_issues_version(o.key)
        if version is not None and (version in kept or version in folders):
            continue
        if o.last_modified < cutoff:
            reason = f"older than {days} days"
            out.append(Deletion(o.key, o.size, "report", o.key, reason))
    return out
