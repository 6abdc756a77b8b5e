"""Incremental mirror of a storage prefix into a local cache directory.

A manifest (``<cache>/manifests/<prefix>.json``) records key, etag, size and local path per
object: an object whose etag and size are unchanged is never downloaded again, and an object
that left storage leaves the cache. A local-folder root is read in place (nothing copied).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from darkroom import layout
from darkroom.config import RetrainConfig, RuntimeConfig
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Images darkroom does not read: refused and reported (never skipped in silence).
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2",
    ".j2k", ".svg", ".ico", ".psd", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2")  # fmt: skip
MAX_FAILED_REASONS = 20  # why the first few failed: enough to tell a cause, bounded in size
SHOWN_FAILURES = 3  # named in SyncIncomplete's message


class UnsupportedFormat(ValueError):
    """An image file in a format darkroom does not read (judged by its name)."""

    status = "unsupported_format"

    def __init__(self, key: str):
        super().__init__(
            f"'{printable_key(key)}' is an image format darkroom does not read: convert it to "
            f"one of {', '.join(IMAGE_EXTENSIONS)}"
        )


class SyncIncomplete(StorageError):
    """More listed objects failed to download than the run accepts. Retriable: what did
    download is cached and in the manifest, so a retried sync fetches only the rest."""


class SyncDenied(SyncIncomplete, StorageSetupError):
    """SyncIncomplete where every failure was a refusal (access denied): not retried."""


@dataclass
class SyncReport:
    prefix: str
    listed: int = 0
    new: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    refused: int = 0
    ignored: int = 0  # files that are not images at all (notes.txt, .DS_Store)
    failed: int = 0
    denied: int = 0  # of the failures, refusals a retry cannot fix (access denied)
    downloaded_bytes: int = 0
    refused_keys: list[str] = field(default_factory=list)  # printable (see printable_key)
    # printable key -> {"status", "error"}: what the index's quarantine report says of it
    refused_reasons: dict[str, dict[str, str]] = field(default_factory=dict)
    failed_keys: list[str] = field(default_factory=list)
    # key -> why it failed, for the first MAX_FAILED_REASONS failures
    failed_reasons: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        left_out = " (left out of the manifest)" if self.failed else ""
        return (
            f"sync {self.prefix}: listed {self.listed}, new {self.new}, changed {self.changed}, "
            f"removed {self.removed}, unchanged {self.unchanged}, refused {self.refused}, "
            f"ignored {self.ignored} (not images), failed {self.failed}{left_out}, downloaded {self.downloaded_bytes} bytes"
        )

    def add_failure(self, key: str, error: Exception) -> None:
        self.failed += 1
        self.denied += isinstance(error, StorageSetupError | PermissionError)
        self.failed_keys.append(key)
        if len(self.failed_reasons) < MAX_FAILED_REASONS:
            self.failed_reasons[key] = str(error) or type(error).__name__

    def refuse(self, key: str, error: UnsafeKeyError | UnsupportedFormat) -> None:
        shown = printable_key(key)
        self.refused += 1
        self.refused_keys.append(shown)
        self.refused_reasons[shown] = {"status": error.status, "error": str(error)}
        log.warning("refused '%s': %s", shown, error)  # not %r: it would double each backslash

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CachedObject:
    key: str
    etag: str
    size: int
    path: str


def is_image_key(key: str) -> bool:
    """Whether ``key`` names an image darkroom can use. A file name that is not UTF-8 is
    not one: it is skipped with a warning, so no planner hashes or reports it as text."""
    if not key.lower().endswith(IMAGE_EXTENSIONS):
        return False
    if not key.isascii() and printable_key(key) != key:
        log.warning("skipped '%s': the file name is not valid UTF-8: rename it", printable_key(key))
        return False
    return True


def is_unsupported_image(key: str) -> bool:
    """Whether ``key`` names an image in a format darkroom does not read (.gif, .heic...)."""
    return key.lower().endswith(UNSUPPORTED_IMAGE_EXTENSIONS)


def names_an_image(key: str) -> bool:
    """Whether ``key`` is one a user put in as an image: one darkroom reads, or one in a
    format it refuses (which then gets a row saying so, never a silent skip)."""
    return is_unsupported_image(key) or is_image_key(key)


def _manifest_path(cache_dir: Path, prefix: str) -> Path:
    name = prefix.strip("/").replace("/", "__") or "root"
    return cache_dir / "manifests" / f"{name}.json"


def load_manifest(cache_dir: Path, prefix: str) -> dict[str, CachedObject]:
    path = _manifest_path(Path(cache_dir), prefix)
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())
    return {r["key"]: CachedObject(**r) for r in rows}


def _refused_path(cache_dir: Path, prefix: str) -> Path:
    return cache_dir / "refused" / _manifest_path(cache_dir, prefix).name


def _save_manifest(cache_dir: Path, prefix: str, entries: dict[str, CachedObject]) -> None:
    rows = [asdict(entries[k]) for k in sorted(entries)]
    atomic_write_file(_manifest_path(cache_dir, prefix), json.dumps(rows).encode())


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


def cache_path(cache_dir: Path, key: str) -> Path:
    """Where ``key`` lives in the cache. Refuses keys that would escape ``cache_dir``."""
    check_key(key)
    root = (Path(cache_dir) / "objects").resolve()
    path = root.joinpath(*key.split("/")).resolve()
    if not path.is_relative_to(root):
        raise UnsafeKeyError(f"key {key!r} escapes the cache directory")
    return path


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
    _save_manifest(cache_dir, prefix, entries)
    _save_refused(cache_dir, prefix, report.refused_reasons)
    log.info(report.summary())
    return report, entries


def fetch_objects(
    storage: Storage,
    objects: Iterable[ObjectInfo],
    cache_dir: Path,
    report: SyncReport | None = None,
    concurrency: int | None = None,
    progress: Progress = None,
) -> dict[str, CachedObject]:
    """Downloads ``objects`` into the cache, ``concurrency`` at a time (default: the config's
    ``download_concurrency``), one GET each, checked against its listing entry. A local root
    is read in place: nothing is copied and no thread is started."""
    objects = list(objects)
    report = report or SyncReport(prefix="")
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, len(objects))

    out: dict[str, CachedObject] = {}
    remote: list[ObjectInfo] = []
    for obj in objects:
        try:
            local = storage.local_path(obj.key)
        except UnsafeKeyError as e:
            report.refuse(obj.key, e)
            tick()
            continue
        if local is None:
            remote.append(obj)
            continue
        out[obj.key] = CachedObject(obj.key, obj.etag, obj.size, str(local))
        tick()
    if remote:
        threads = min(concurrency or default_threads(), len(remote))
        remote_storage = storage.for_threads(threads)
        out.update(_download_all(remote_storage, remote, cache_dir, report, threads, tick))
    return out


def default_threads() -> int:  # when the caller names none: the config's default, its one home
    return RuntimeConfig.model_fields["download_concurrency"].default


def _download_all(storage, objects, cache_dir: Path, report: SyncReport, threads, tick) -> dict:
    """Downloads ``objects`` on ``threads`` threads; a loss is counted in ``report``."""

    def one(obj: ObjectInfo) -> CachedObject:
        storage.download(obj.key, dest := cache_path(cache_dir, obj.key), obj)
        return CachedObject(obj.key, obj.etag, obj.size, str(dest))

    out = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {pool.submit(one, o): o for o in objects}
        try:
            for fut in as_completed(futures):
                obj = futures[fut]
                try:
                    out[obj.key] = fut.result()
                except UnsafeKeyError as e:
                    report.refuse(obj.key, e)
                except Exception as e:  # the caller decides what a loss means (check_complete)
                    report.add_failure(obj.key, e)
                    log.warning("could not fetch %s: %s", obj.key, e)
                else:
                    report.downloaded_bytes += obj.size
                tick()
        except BaseException:  # SIGTERM, a timeout: the downloads under way end, no more start
            pool.shutdown(cancel_futures=True)
            raise
    return out


def local_paths(storage: Storage, rows, cache_dir: str | Path) -> list[str]:
    """Local files for index rows (key, etag, bytes): from the labeled/ manifest, fetching
    whatever is missing or stale (a worker that never synced fetches what it needs)."""
    manifest = load_manifest(Path(cache_dir), layout.LABELED)
    missing = [
        ObjectInfo(r.key, int(r.bytes), r.etag, datetime.now(UTC))
        for r in rows.itertuples()
        if manifest.get(r.key, None) is None
        or manifest[r.key].etag != r.etag
        or not Path(manifest[r.key].path).exists()
    ]
    report = SyncReport(prefix=layout.LABELED)
    if missing:
        manifest = {**manifest, **fetch_objects(storage, missing, Path(cache_dir), report)}
    lost = [k for k in rows["key"] if k not in manifest]
    if lost:
        why = report.failed_reasons.get(lost[0])
        raise FileNotFoundError(
            f"{len(lost)} indexed images could not be fetched, e.g. {lost[0]}"
            + (f": {why}" if why else "")
        )
    return [manifest[k].path for k in rows["key"]]
