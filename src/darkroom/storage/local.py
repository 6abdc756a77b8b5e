"""The local-folder backend: the embedded default (``file://./data/bucket``)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from darkroom.storage.base import (
    ObjectInfo,
    PreconditionFailed,
    Storage,
    StorageSetupError,
    atomic_write_file,
    check_key,
)


def _is_temp_or_hidden(name: str) -> bool:
    return name.startswith(".")


class LocalStorage(Storage):
    """A folder on disk. Etags are ``<mtime_ns>-<size>`` so listing never reads file contents."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()
        # Conditional writes on one host: a lock file per key serialises check-and-swap.
        self._locks = self.root / ".darkroom-locks"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageSetupError(
                f"storage root {self.root} does not exist: create it (or run `darkroom "
                "demo-data`), or fix --storage"
            )

    @staticmethod
    def _etag_of(st: os.stat_result) -> str:
        return f"{st.st_mtime_ns:x}-{st.st_size:x}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the folder the prefix names, then filter on the full prefix. A name that
        # is not UTF-8 is listed (as surrogate escapes) so that callers can report it;
        # check_key refuses it before anything reads it or spells it as text.
        start = self.root / posixpath.dirname(prefix)
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not _is_temp_or_hidden(d)]
            # Strings, not a Path per file (a Path per file was most of a large listing's time).
            folder = f"{Path(dirpath).relative_to(self.root).as_posix()}/".removeprefix("./")
            for name in filenames:
                key = folder + name
                if _is_temp_or_hidden(name) or not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # removed while listing
                modified = datetime.fromtimestamp(st.st_mtime, UTC)
                found.append(ObjectInfo(key, st.st_size, self._etag_of(st), modified))
        yield from sorted(found, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def etag(self, key: str) -> str | None:
        try:
            return self._etag_of(self._path(key).stat())
        except FileNotFoundError:
            return None

    def _put(self, key, data, if_match, if_none_match) -> str:
        path = self._path(key)
        if if_match is None and not if_none_match:
            return self._replace(path, data)
        import fcntl

        self._locks.mkdir(parents=True, exist_ok=True)
        lock_path = self._locks / (key.replace("/", "__") + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.etag(key)
            if if_none_match and current is not None:
                raise PreconditionFailed(f"{self.url(key)} already exists")
            if if_match is not None and current != if_match:
                raise PreconditionFailed(
                    f"{self.url(key)} changed since it was read (etag {current} != {if_match})"
                )
            return self._replace(path, data)

    def _replace(self, path: Path, data: bytes) -> str:
        # mtime granularity can be coarser than two quick writes: keep mtime strictly
        # increasing so no rewrite reuses an earlier etag (a stale if_match must lose).
        try:
            before = path.stat().st_mtime_ns
        except FileNotFoundError:
            before = None
        atomic_write_file(path, data)
        st = path.stat()
        if before is not None and st.st_mtime_ns <= before:
            os.utime(path, ns=(st.st_atime_ns, before + 1))
            st = path.stat()
        return self._etag_of(st)

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _delete_many(self, keys: list[str]) -> dict[str, str]:
        """Removes the files, then the folders they leave empty (up to the root)."""
        failed = super()._delete_many(keys)
        folders = {self._path(k).parent for k in keys}
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            while folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): its parents are not empty either
                    break
                folder = folder.parent
        return failed

    def local_path(self, key: str) -> Path | None:
        return self._path(key)
