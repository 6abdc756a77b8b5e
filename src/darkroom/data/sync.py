"""Incremental mirror of a storage prefix into a local cache directory.

A manifest (``<cache>/manifests/<prefix>.json``, see ``darkroom.data.fetch``) records key, etag,
size and local path per object: an object whose etag and size are unchanged is never downloaded
again, and an object that left storage leaves the cache. A local-folder root is read in place
(nothing copied).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from darkroom import layout
from darkroom.config import RetrainConfig
from darkroom.data.fetch import (
    CachedObject,
    SyncReport,
    fetch_objects,
    load_manifest,
    manifest_path,
    save_manifest,
)
from darkroom.data.names import UnsupportedFormat, is_image_key, is_unsupported_image
from darkroom.data.progress import Progress
from darkroom.storage import (
    ObjectInfo,
    Storage,
    StorageError,
    StorageSetupError,
    UnsafeKeyError,
    atomic_write_file,
    check_key,
    printable_key,
)

log = logging.getLogger(__name__)

SHOWN_FAILURES = 3  # named in SyncIncomplete's message


class SyncIncomplete(StorageError):
    """More listed objects failed to download than the run accepts. Retriable: what did
    download is cached and in the manifest, so a retried sync fetches only the rest."""


class SyncDenied(SyncIncomplete, StorageSetupError):
    """SyncIncomplete where every failure was a refusal (access denied): not retried."""


def _refused_path(cache_dir: Path, prefix: str) -> Path:
    return cache_dir / "refused" / manifest_path(cache_dir, prefix).name


def _save_refused(cache_dir: Path, prefix: str, refused: dict[str, dict[str, str]]) -> None:
    # Kept beside the manifest so that the index reports them: a refusal is never lost.
    path = _refused_path(cache_dir, prefix)
    if refused:
        atomic_write_file(path, json.dumps(refused).encode())
    else:
        path.unlink(missing_ok=True)


def load_refused(cache_dir: Path, prefix: str) -> dict[str, dict[str, str]]:
    """The objects the last sync of ``prefix`` refused: printable key -> status and error."""
    path = _refused_path(Path(cache_dir), prefix)
    return json.loads(path.read_text()) if path.exists() else {}


def sync_labeled(storage: Storage, config: RetrainConfig, progress: Progress = None) -> SyncReport:
    """The sync stage: mirrors ``labeled/`` into the run's cache (a local root is read in
    place). All or nothing by default: a retrain never trains on a silent subset.

    Raises:
        SyncIncomplete: more objects failed to download than ``config.max_failed_fraction``
            of those listed (by default: any). The rest are cached and in the manifest.
    """
    report, _ = sync_prefix(
        storage,
        layout.LABELED,
        config.cache_path(storage.uri),
        concurrency=config.download_concurrency,
        progress=progress,
    )
    check_complete(report, storage.url(layout.LABELED), config.max_failed_fraction)
    return report


def check_complete(report: SyncReport, where: str, max_failed_fraction: float = 0.0) -> None:
    """Raises SyncIncomplete when ``report.failed`` exceeds ``max_failed_fraction`` of the
    listed objects; a smaller loss is logged as a warning and the run goes on without them."""
    if not report.failed:
        return
    failed = f"{report.failed} of {report.listed} objects under {where} could not be downloaded"
    examples = [f"{k}: {v}" for k, v in sorted(report.failed_reasons.items())[:SHOWN_FAILURES]]
    more = report.failed - len(examples)
    examples += [f"{more} more"] if more else []
    if report.failed <= max_failed_fraction * report.listed:
        log.warning(
            "%s (e.g. %s): they are left out of this run (max_failed_fraction %g)",
            failed,
            "; ".join(examples),
            max_failed_fraction,
        )
        return
    allowed = f"{max_failed_fraction:g} allows {int(max_failed_fraction * report.listed) or 'none'}"
    denied = report.denied == report.failed
    raise (SyncDenied if denied else SyncIncomplete)(
        f"{failed} (e.g. {'; '.join(examples)}): the retrain stops before indexing "
        f"(max_failed_fraction {allowed}); fix access or set max_failed_fraction to accept a "
        "partial set ("
        + (
            "every failure was a refusal: not retried"
            if denied
            else "a retry downloads only the missing objects"
        )
        + ")"
    )


def _list_safe(storage: Storage, prefix: str, key_filter, report: SyncReport) -> dict:
    """The objects under ``prefix`` that pass ``key_filter``; unsafe keys, file names that
    are not UTF-8 and images in formats darkroom does not read are refused: counted and named
    in the report, never fetched. Other files are counted as ignored."""
    listed: dict[str, ObjectInfo] = {}
    for obj in storage.list(prefix):
        try:
            check_key(obj.key)
        except UnsafeKeyError as e:
            # Filtered as the name is shown: is_image_key itself skips an undecodable name.
            if key_filter(printable_key(obj.key)):
                report.listed += 1
                report.refuse(obj.key, e)
            continue
        if key_filter(obj.key):
            report.listed += 1
            listed[obj.key] = obj
        elif is_unsupported_image(obj.key):
            report.listed += 1
            report.refuse(obj.key, UnsupportedFormat(obj.key))
        else:
            report.ignored += 1
    return listed


def sync_prefix(
    storage: Storage,
    prefix: str,
    cache_dir: str | Path,
    *,
    concurrency: int | None = None,
    key_filter: Callable[[str], bool] = is_image_key,
    progress: Progress = None,
) -> tuple[SyncReport, dict[str, CachedObject]]:
    """Mirrors ``prefix`` of ``storage`` into ``cache_dir``.

    Returns:
        The report and the manifest: every usable object with the local path to read it from.
    """
    cache_dir = Path(cache_dir)
    report = SyncReport(prefix=prefix)
    old = load_manifest(cache_dir, prefix)
    listed = _list_safe(storage, prefix, key_filter, report)
    entries: dict[str, CachedObject] = {}
    todo: list[ObjectInfo] = []
    for key, obj in listed.items():
        prev = old.get(key)
        if prev and prev.etag == obj.etag and prev.size == obj.size and Path(prev.path).exists():
            report.unchanged += 1
            entries[key] = prev
        else:
            report.changed += prev is not None
            report.new += prev is None
            todo.append(obj)

    entries.update(fetch_objects(storage, todo, cache_dir, report, concurrency, progress))

    for key in old.keys() - listed.keys():
        report.removed += 1
        if storage.local_path(key) is None:  # only ever delete our own cached copy
            Path(old[key].path).unlink(missing_ok=True)
    save_manifest(cache_dir, prefix, entries)
    _save_refused(cache_dir, prefix, report.refused_reasons)
    log.info(report.summary())
    return report, entries
