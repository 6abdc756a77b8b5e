"""Downloading objects into the local cache, and the manifest that says what is there.

Shared by the sync (``darkroom.data.sync``), by training and promotion (``local_paths``: a
worker fetches the indexed images it lacks) and by scoring (a chunk's objects). A local-folder
root is read in place (nothing copied). The manifest (``<cache>/manifests/<prefix>.json``)
records key, etag, size and local path per object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from darkroom import layout
from darkroom.config import RuntimeConfig
from darkroom.data.names import UnsupportedFormat
from darkroom.data.progress import Progress
from darkroom.storage import (
    ObjectInfo,
    Storage,
    StorageSetupError,
    UnsafeKeyError,
    atomic_write_file,
    check_key,
    printable_key,
)

log = logging.getLogger(__name__)

MAX_FAILED_REASONS = 20  # why the first few failed: enough to tell a cause, bounded in size


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


def manifest_path(cache_dir: Path, prefix: str) -> Path:
    name = prefix.strip("/").replace("/", "__") or "root"
    return cache_dir / "manifests" / f"{name}.json"


def load_manifest(cache_dir: Path, prefix: str) -> dict[str, CachedObject]:
    path = manifest_path(Path(cache_dir), prefix)
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())
    return {r["key"]: CachedObject(**r) for r in rows}


def save_manifest(cache_dir: Path, prefix: str, entries: dict[str, CachedObject]) -> None:
    rows = [asdict(entries[k]) for k in sorted(entries)]
    atomic_write_file(manifest_path(cache_dir, prefix), json.dumps(rows).encode())


def cache_path(cache_dir: Path, key: str) -> Path:
    """Where ``key`` lives in the cache. Refuses keys that would escape ``cache_dir``."""
    check_key(key)
    root = (Path(cache_dir) / "objects").resolve()
    path = root.joinpath(*key.split("/")).resolve()
    if not path.is_relative_to(root):
        raise UnsafeKeyError(f"key {key!r} escapes the cache directory")
    return path


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
